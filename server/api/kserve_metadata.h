// What the Open Inference Protocol's metadata RPCs say about a layer, built from its config: ModelMetadata
// (inputs and outputs with datatypes and shapes, -1 for dimensions that vary by request), ModelConfig (the
// Triton ModelConfig subset) and ModelStatistics (from LayerStatistics).
#pragma once

#include "inference/grpc_service.pb.h"
#include "server/observability/layer_statistics.h"
#include "server/runtime/layer_registry.h"

namespace attnserve {

void DescribeModelMetadata(const ServedLayer& layer, inference::ModelMetadataResponse* out);
void DescribeModelConfig(const ServedLayer& layer, inference::ModelConfig* out);
void DescribeModelStatistics(const VersionStatistics& stats, inference::ModelStatistics* out);

}  // namespace attnserve
