// What the Open Inference Protocol's metadata RPCs say about a layer, built from its config: ModelMetadata
// (inputs and outputs with datatypes and shapes, -1 for dimensions that vary by request), ModelConfig (the
// Triton ModelConfig subset) and ModelStatistics (from LayerStatistics).
#pragma once

#include <cstdint>
#include <vector>

#include "inference/grpc_service.pb.h"
#include "server/observability/layer_statistics.h"
#include "server/runtime/layer_registry.h"

namespace attnserve {

// `versions`: every version of the layer loaded (ModelMetadata lists them all).
void DescribeModelMetadata(const ServedLayer& layer, const std::vector<int64_t>& versions,
                           inference::ModelMetadataResponse* out);
void DescribeModelConfig(const ServedLayer& layer, inference::ModelConfig* out);
void DescribeModelStatistics(const VersionStatistics& stats, inference::ModelStatistics* out);

}  // namespace attnserve
