#include "core/team_scratch.h"

#include "core/decoder_attention.h"
#include "core/flash_attention.h"
#include "core/multihead_attention.h"
#include "core/onednn_ops.h"

namespace attnserve {
namespace {

void ReleaseThisThread(size_t keep_bytes) {
  ReleaseThreadScratch(keep_bytes);  // the multi-head engine's and ShortAttention's
  ReleaseDecoderScratch(keep_bytes);
  ReleaseFlashScratch(keep_bytes);
  ReleaseOnednnThreadScratch(keep_bytes);
}

}  // namespace

void ReleaseTeamScratch(int threads, size_t keep_bytes) {
  if (threads <= 1) {  // no parallel construct: a team of one would still start a region
    ReleaseThisThread(keep_bytes);
    return;
  }
#pragma omp parallel num_threads(threads)
  ReleaseThisThread(keep_bytes);
}

}  // namespace attnserve
