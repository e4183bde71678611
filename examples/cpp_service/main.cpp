// cpp_service — a small multi-threaded service embedding pagedrt.
//
//   cpp_service <model folder> [clients=8] [requests per client=16]
//
// Each client thread plays a connection: it submits requests (token ids; the
// host owns tokenization), streams each one's events with poll(id, timeout),
// and cancels some mid-stream. One more thread watches stats(). At the end it
// prints a summary and exits non-zero if any request did not get exactly one
// final event, or the KV pool did not come back whole.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <pagedrt/pagedrt.hpp>

namespace {

struct ClientResult {
  int requests = 0, completed = 0, cancelled = 0, lost = 0;
  long tokens = 0;
};

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// One request from submit to its final event; false if the final event never came.
bool serve_one(pagedrt::Runtime& rt, std::mt19937& rng, int vocab, bool cancel, ClientResult& out) {
  std::vector<int32_t> prompt(4 + rng() % 28);
  for (int32_t& t : prompt) t = static_cast<int32_t>(rng() % vocab);
  pagedrt::SamplingParams params;
  params.max_tokens = 8 + static_cast<int>(rng() % 24);
  params.temperature = (rng() % 2) ? 0.0f : 0.8f;
  params.has_seed = true;
  params.seed = rng();
  // ById: only poll(id) sees this request's events, whatever other threads poll.
  const std::string id = rt.submit(prompt, params, "", pagedrt::Delivery::ById);
  ++out.requests;
  int finals = 0;
  const double deadline = now_s() + 120.0;
  while (finals == 0 && now_s() < deadline) {
    for (const pagedrt::Event& ev : rt.poll(id, 0.05)) {
      out.tokens += static_cast<long>(ev.token_ids.size());
      if (cancel && !ev.finished) rt.abort(id);  // the client hung up after its first tokens
      if (ev.request_finished) {
        ++finals;
        if (ev.finish_reason == pagedrt::FinishReason::Abort) ++out.cancelled;
        else if (ev.finish_reason == pagedrt::FinishReason::Error) std::fprintf(stderr, "%s: %s\n", id.c_str(), ev.error.c_str());
        else ++out.completed;
      }
    }
  }
  try {  // nothing follows the final event: once it is read, the id is closed
    finals += static_cast<int>(rt.poll(id, 0.0).size()) + 1;
  } catch (const pagedrt::Error&) {
  }
  return finals == 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s <model folder> [clients] [requests per client]\n", argv[0]);
    return 2;
  }
  const int clients = argc > 2 ? std::atoi(argv[2]) : 8;
  const int per_client = argc > 3 ? std::atoi(argv[3]) : 16;

  try {
    pagedrt::RuntimeConfig config;
    config.model_path = argv[1];
    config.device = "cpu";
    config.kv_cache_bytes = 4 << 20;  // small on purpose: requests compete for blocks
    pagedrt::Runtime rt(config);
    const int vocab = static_cast<int>(rt.model_info().vocab_size);

    std::vector<ClientResult> results(clients);
    std::atomic<bool> running{true};
    std::atomic<long> peak_blocks{0};
    std::thread monitor([&] {
      while (running) {
        const pagedrt::Stats st = rt.stats();
        if (st.blocks_used > peak_blocks) peak_blocks = st.blocks_used;
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
    });
    const double t0 = now_s();
    std::vector<std::thread> threads;
    for (int c = 0; c < clients; ++c)
      threads.emplace_back([&, c] {
        std::mt19937 rng(c);
        for (int i = 0; i < per_client; ++i)
          if (!serve_one(rt, rng, vocab, rng() % 5 == 0, results[c])) ++results[c].lost;
      });
    for (std::thread& t : threads) t.join();
    running = false;
    monitor.join();
    const double secs = now_s() - t0;

    ClientResult total;
    for (const ClientResult& r : results) {
      total.requests += r.requests;
      total.completed += r.completed;
      total.cancelled += r.cancelled;
      total.lost += r.lost;
      total.tokens += r.tokens;
    }
    const pagedrt::Stats st = rt.stats();
    std::printf("cpp_service: %d clients, %d requests in %.2f s: %d completed, %d cancelled, %d lost; "
                "%ld tokens (%.0f tok/s); KV pool %lld blocks, peak %ld used, %lld preemptions, %lld in use at the end\n",
                clients, total.requests, secs, total.completed, total.cancelled, total.lost, total.tokens,
                total.tokens / secs, static_cast<long long>(st.num_blocks), peak_blocks.load(),
                static_cast<long long>(st.num_preemptions), static_cast<long long>(st.blocks_used));
    rt.close();
    return total.lost == 0 && total.requests == clients * per_client && st.blocks_used == 0 ? 0 : 1;
  } catch (const pagedrt::Error& e) {
    std::fprintf(stderr, "cpp_service: %s\n", e.what());
    return 1;
  }
}
