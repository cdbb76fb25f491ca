// Early-return helpers for absl::Status / absl::StatusOr, used across core/, server/ and tools/.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define ATTN_CONCAT_INNER_(a, b) a##b
#define ATTN_CONCAT_(a, b) ATTN_CONCAT_INNER_(a, b)

// Returns the status from the enclosing function when `expr` is not OK.
#define ATTN_RETURN_IF_ERROR(expr)                 \
  do {                                             \
    const ::absl::Status attn_status_ = (expr);    \
    if (!attn_status_.ok()) return attn_status_;   \
  } while (0)

// `lhs = value of expr`, or returns its error status.
#define ATTN_ASSIGN_OR_RETURN(lhs, expr) \
  ATTN_ASSIGN_OR_RETURN_IMPL_(ATTN_CONCAT_(attn_statusor_, __LINE__), lhs, expr)
#define ATTN_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                \
  if (!tmp.ok()) return tmp.status();               \
  lhs = std::move(tmp).value()
