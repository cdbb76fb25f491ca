// What a config reload cannot apply: the server changes its layers while serving, and every other field only
// with a restart. The reload names those fields in its warning, so an operator knows what did not take effect.
#pragma once

#include <string>
#include <vector>

#include "attnserve/v1/config.pb.h"

namespace attnserve {

// The top-level fields of `loaded` other than `layers` that differ from `served`, by name, in field order.
// worker_threads compares by the count it resolves to (0 = one per CPU, cpu_budget.h): `resolved_workers` is
// the served count and `cpus` the CPUs it was resolved for, so 0 and an explicit equal count are no change.
std::vector<std::string> FieldsNeedingRestart(const v1::ServerConfig& served, const v1::ServerConfig& loaded,
                                              int resolved_workers, int cpus);

}  // namespace attnserve
