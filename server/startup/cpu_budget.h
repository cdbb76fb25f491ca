// How many CPUs this process may really use, for sizing worker and OpenMP threads. Neither
// std::thread::hardware_concurrency() nor OpenMP's default sees a container's CPU limit.
#pragma once

#include <string>

namespace attnserve {

// CPUs in the affinity mask, capped by the cgroup CPU quota (v2 cpu.max, else v1 cfs quota/period),
// rounded up; at least 1.
int AvailableCpus();

// The CPUs a cgroup v2 "cpu.max" line allows ("150000 100000" -> 2, rounded up); 0 for "max" (no limit)
// or anything unparsable.
int CpusFromCgroupV2(const std::string& cpu_max);
// The same for cgroup v1's cpu.cfs_quota_us and cpu.cfs_period_us (quota -1 = no limit).
int CpusFromCgroupV1(const std::string& quota_us, const std::string& period_us);

}  // namespace attnserve
