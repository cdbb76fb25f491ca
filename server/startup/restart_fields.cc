#include "server/startup/restart_fields.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/util/message_differencer.h>

#include "server/startup/cpu_budget.h"
#include "server/startup/server_config.h"

namespace attnserve {

std::vector<std::string> FieldsNeedingRestart(const v1::ServerConfig& served, const v1::ServerConfig& loaded,
                                              int resolved_workers, int cpus) {
  v1::ServerConfig compared = loaded;
  if (WorkerThreadsFor(loaded.worker_threads(), cpus, kMaxAutoWorkerThreads) == resolved_workers) {
    compared.set_worker_threads(served.worker_threads());
  }
  std::vector<std::string> changed;
  google::protobuf::util::MessageDifferencer differencer;
  const google::protobuf::Descriptor* descriptor = v1::ServerConfig::descriptor();
  for (int i = 0; i < descriptor->field_count(); ++i) {
    const google::protobuf::FieldDescriptor* field = descriptor->field(i);
    if (field->name() == "layers") continue;
    if (!differencer.CompareWithFields(served, compared, {field}, {field})) {
      changed.push_back(field->name());
    }
  }
  return changed;
}

}  // namespace attnserve
