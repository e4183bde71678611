#include "model/tp_plan.hpp"

#include <string>

#include "pagedrt/error.hpp"

namespace pagedrt {

TpPlan TpPlan::make(const LlamaConfig& cfg, int rank, int size) {
  const std::string where = "tensor_parallel_size " + std::to_string(size);
  if (size != 1 && size != 2 && size != 4 && size != 8)
    throw Error(ErrorKind::InvalidArgument, where + ": must be 1, 2, 4 or 8");
  if (rank < 0 || rank >= size)
    throw Error(ErrorKind::InvalidArgument, where + ": no rank " + std::to_string(rank));
  auto divides = [&](int64_t value, const char* field) {
    if (value % size != 0)
      throw Error(ErrorKind::InvalidArgument, where + " does not divide the model's " + field + " (" +
                                                  std::to_string(value) + "): each rank holds an equal share");
    return value / size;
  };
  TpPlan p;
  p.rank = rank;
  p.size = size;
  p.q_heads = divides(cfg.num_heads, "num_attention_heads");
  p.kv_heads = divides(cfg.num_kv_heads, "num_key_value_heads");
  p.inter = divides(cfg.intermediate_size, "intermediate_size");
  p.vocab_rows = (cfg.vocab_size + size - 1) / size;
  return p;
}

LlamaConfig TpPlan::local(const LlamaConfig& cfg) const {
  LlamaConfig c = cfg;
  c.num_heads = q_heads;
  c.num_kv_heads = kv_heads;
  c.intermediate_size = inter;
  return c;
}

}  // namespace pagedrt
