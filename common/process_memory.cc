#include "common/process_memory.h"

#include <unistd.h>

#include <cstdio>

namespace attnserve {

int64_t ResidentSetBytes() {
  FILE* statm = std::fopen("/proc/self/statm", "r");
  if (statm == nullptr) return -1;
  long total_pages = 0, resident_pages = 0;
  const int fields = std::fscanf(statm, "%ld %ld", &total_pages, &resident_pages);
  std::fclose(statm);
  if (fields != 2) return -1;
  return static_cast<int64_t>(resident_pages) * sysconf(_SC_PAGESIZE);
}

}  // namespace attnserve
