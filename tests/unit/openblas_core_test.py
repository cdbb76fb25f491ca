#!/usr/bin/python3
"""bench/openblas_core.py: which OpenBLAS kernels the PyTorch baselines get. The rule on fixed inputs, then
this machine: after pin(), OpenBLAS must load AVX2-or-better kernels wherever the CPU has AVX2 (a baseline on
SSE3 kernels ran 6x slow and made the ratios against PyTorch meaningless)."""

import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
import openblas_core  # noqa: E402

AVX2 = {"sse3", "avx", "avx2", "fma"}
AVX512 = AVX2 | {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


class BetterCoreTest(unittest.TestCase):
    def test_generic_kernels_on_an_avx512_cpu_become_skylakex(self):
        self.assertEqual(openblas_core.better_core("Prescott", AVX512), "SkylakeX")
        self.assertEqual(openblas_core.better_core("Sandybridge", AVX512 | {"amx_tile"}), "SkylakeX")
        self.assertEqual(openblas_core.better_core("Opteron_SSE3", AVX512), "SkylakeX")

    def test_generic_kernels_on_an_avx2_cpu_become_haswell(self):
        self.assertEqual(openblas_core.better_core("Prescott", AVX2), "Haswell")
        self.assertEqual(openblas_core.better_core("Nehalem", AVX2 | {"avx512f"}), "Haswell")  # not all of AVX-512

    def test_a_core_openblas_knows_is_kept(self):
        for core in ("Haswell", "Zen", "SkylakeX", "Cooperlake", "SapphireRapids"):
            self.assertIsNone(openblas_core.better_core(core, AVX512), core)

    def test_nothing_is_forced_without_avx2_or_without_a_reading(self):
        self.assertIsNone(openblas_core.better_core("Prescott", {"sse3", "avx"}))
        self.assertIsNone(openblas_core.better_core(None, AVX512))


class ThisMachineTest(unittest.TestCase):
    def test_after_pin_this_process_loads_avx2_kernels_where_the_cpu_has_them(self):
        note = openblas_core.pin()  # nothing in this process has loaded OpenBLAS yet, as in the baselines
        core = openblas_core.loaded_core()
        if core is None:
            self.skipTest("libopenblas.so.0 is not installed here (scripts/install-deps.sh installs it)")
        print(f"{note}; loaded: {core}")
        if {"avx2", "fma"} <= openblas_core.cpu_flags():
            self.assertIn(core.lower(), openblas_core.AVX2_CORES, note)

    def test_a_second_pin_keeps_what_the_first_found(self):
        first = openblas_core.pin()
        self.assertEqual(openblas_core.pin(), first)


if __name__ == "__main__":
    unittest.main(verbosity=2)
