#include "engine/model_runner.hpp"

namespace pagedrt {

ModelRunner::ModelRunner(std::shared_ptr<Backend> backend, std::unique_ptr<LlamaModel> model, KvCache kv)
    : backend_(std::move(backend)), model_(std::move(model)), kv_(std::move(kv)) {}

ModelOutput ModelRunner::run(const SchedulerOutput& step, bool device_greedy, bool defer_picks) {
  batch_.build(step, static_cast<int32_t>(kv_.block_size));
  const BatchView& view = batch_.view();
  ModelOutput out;
  out.vocab = model_->config().vocab_size;
  out.slices = &batch_.logits();
  out.num_rows = view.num_logits;
  // 256 x 128K fp32 logits a step would otherwise cross to the host.
  if (device_greedy)
    argmax_.resize(static_cast<size_t>(view.num_logits));
  else
    logits_.resize(static_cast<size_t>(view.num_logits) * out.vocab);
  if (!step.copies.empty())
    for (size_t l = 0; l < kv_.k.size(); ++l) {
      backend_->copy_blocks(kv_.k[l], step.copies);
      backend_->copy_blocks(kv_.v[l], step.copies);
    }
  if (device_greedy && defer_picks) {
    model_->forward(view, kv_, nullptr, nullptr);  // the logits stay on the device for pick()
    return out;
  }
  model_->forward(view, kv_, logits_.data(), device_greedy ? argmax_.data() : nullptr);
  if (device_greedy)
    out.argmax = argmax_.data();
  else
    out.logits = logits_.data();
  return out;
}

void ModelRunner::pick(ModelOutput& out, const RowMasks& masks) {
  model_->pick(out.num_rows, argmax_.data(), masks);
  out.argmax = argmax_.data();
}

void ModelRunner::release() {
  model_.reset();
  kv_ = KvCache{};
  backend_.reset();
  std::vector<float>().swap(logits_);
}

}  // namespace pagedrt
