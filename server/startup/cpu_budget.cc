#include "server/startup/cpu_budget.h"

#include <sched.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <thread>

namespace attnserve {
namespace {

std::string ReadFirstLine(const char* path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

int CeilDiv(long long quota, long long period) {
  if (quota <= 0 || period <= 0) return 0;
  return static_cast<int>((quota + period - 1) / period);
}

}  // namespace

int CpusFromCgroupV2(const std::string& cpu_max) {
  std::istringstream in(cpu_max);
  std::string quota;
  long long period = 0;
  if (!(in >> quota >> period) || quota == "max") return 0;
  try {
    return CeilDiv(std::stoll(quota), period);
  } catch (...) {  // std::stoll on a malformed file: treat as no limit
    return 0;
  }
}

int CpusFromCgroupV1(const std::string& quota_us, const std::string& period_us) {
  try {
    return CeilDiv(std::stoll(quota_us), std::stoll(period_us));
  } catch (...) {
    return 0;
  }
}

int WorkerThreadsFor(int configured, int cpus, int max_auto) {
  if (configured > 0) return configured;
  return std::clamp(cpus, 1, std::max(1, max_auto));
}

int AvailableCpus() {
  int cpus = static_cast<int>(std::thread::hardware_concurrency());
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) cpus = CPU_COUNT(&set);
  int quota = CpusFromCgroupV2(ReadFirstLine("/sys/fs/cgroup/cpu.max"));
  if (quota == 0) {
    quota = CpusFromCgroupV1(ReadFirstLine("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
                             ReadFirstLine("/sys/fs/cgroup/cpu/cpu.cfs_period_us"));
  }
  if (quota > 0) cpus = std::min(cpus, quota);
  return std::max(cpus, 1);
}

}  // namespace attnserve
