// How many CPUs this process may really use, for sizing worker and OpenMP threads. Neither
// std::thread::hardware_concurrency() nor OpenMP's default sees a container's CPU limit.
#pragma once

#include <string>

namespace attnserve {

// CPUs in the affinity mask, capped by the cgroup CPU quota (v2 cpu.max, else v1 cfs quota/period),
// rounded up; at least 1.
int AvailableCpus();

// The workers computing batches: `configured` when > 0, else one per CPU up to `max_auto` (each worker keeps
// an OpenMP team of its own, so on large machines more workers would mostly add idle threads).
int WorkerThreadsFor(int configured, int cpus, int max_auto);

// The CPUs a cgroup v2 "cpu.max" line allows ("150000 100000" -> 2, rounded up); 0 for "max" (no limit)
// or anything unparsable.
int CpusFromCgroupV2(const std::string& cpu_max);
// The same for cgroup v1's cpu.cfs_quota_us and cpu.cfs_period_us (quota -1 = no limit).
int CpusFromCgroupV1(const std::string& quota_us, const std::string& period_us);

}  // namespace attnserve
