// test_runtime_threads.cpp — the public Runtime under concurrency: many threads
// submitting, polling and aborting at once; close() and destruction with
// requests in flight. Built plain, with ThreadSanitizer and with ASan+UBSan
// (tests/test_cpp.py). Needs a model folder in PAGEDRT_TEST_MODEL (a tiny
// random Llama from tests/conftest.py); exits 77 (skipped) without one.
// PAGEDRT_TEST_SCALE (default 1) multiplies the request counts.
#include <atomic>
#include <cstdio>
#include <chrono>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "check.hpp"
#include "pagedrt/pagedrt.hpp"

using namespace pagedrt;

namespace {

std::string g_model;
int g_scale = 1;

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// A small pool (`blocks` blocks of 16 tokens) so that concurrent requests preempt each other.
RuntimeConfig small_config(int64_t blocks) {
  RuntimeConfig c;
  c.model_path = g_model;
  c.device = "cpu";
  c.num_threads = 2;
  c.block_size = 16;
  Runtime probe([&] { RuntimeConfig p = c; p.kv_cache_bytes = 1 << 20; return p; }());
  const Stats st = probe.stats();
  c.kv_cache_bytes = blocks * (st.kv_cache_bytes / st.num_blocks);
  return c;
}

SamplingParams random_params(std::mt19937& rng, int vocab) {
  SamplingParams p;
  p.max_tokens = 1 + static_cast<int>(rng() % 12);
  p.ignore_eos = rng() % 2;
  switch (rng() % 4) {
    case 0: p.temperature = 0.0f; break;
    case 1: p.temperature = 0.8f; p.top_k = 1 + static_cast<int>(rng() % 20); break;
    case 2: p.temperature = 1.2f; p.top_p = 0.9f; p.has_seed = true; p.seed = rng(); break;
    default: p.temperature = 0.7f; p.min_p = 0.05f; p.repetition_penalty = 1.1f; p.n = 2; break;
  }
  if (rng() % 5 == 0) p.stop_token_ids = {static_cast<int32_t>(rng() % vocab)};
  return p;
}

std::vector<int32_t> random_prompt(std::mt19937& rng, int vocab) {
  std::vector<int32_t> t(1 + rng() % 40);
  for (int32_t& x : t) x = static_cast<int32_t>(rng() % vocab);
  return t;
}

void check_pool_back(Runtime& rt) {
  const Stats st = rt.stats();
  CHECK(st.blocks_used == 0);
  CHECK(st.blocks_free == st.num_blocks);
  CHECK(st.num_running == 0 && st.num_waiting == 0);
}

// Each thread keeps a few requests in flight, polls them by id, aborts some.
void test_threads_poll_by_id() {
  Runtime rt(small_config(12));
  const int vocab = static_cast<int>(rt.model_info().vocab_size);
  const int kThreads = 8, kPerThread = 12 * g_scale;
  std::atomic<int> finished{0}, aborted{0}, bad{0};
  std::atomic<bool> done{false};
  std::thread stats_reader([&] {
    while (!done) { (void)rt.stats(); std::this_thread::sleep_for(std::chrono::milliseconds(1)); }
  });
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      std::mt19937 rng(1000 + t);
      for (int i = 0; i < kPerThread; i += 3) {
        std::map<std::string, int> final_events;  // id -> request_finished events seen
        std::map<std::string, int> n;
        for (int k = 0; k < 3; ++k) {
          const SamplingParams p = random_params(rng, vocab);
          const std::string id = rt.submit(random_prompt(rng, vocab), p, "t" + std::to_string(t) + "-" +
                                                                            std::to_string(i + k));
          final_events[id] = 0;
          n[id] = p.n;
          if (rng() % 4 == 0 && rt.abort(id)) ++aborted;
        }
        const double deadline = now_s() + 120.0;
        for (bool open = true; open && now_s() < deadline;) {
          open = false;
          for (auto& [id, count] : final_events) {
            if (count > 0) continue;
            open = true;
            for (const Event& ev : rt.poll(id, 0.01)) {
              if (ev.request_id != id) ++bad;
              if (ev.index < 0 || ev.index >= n[id]) ++bad;
              if (ev.request_finished) ++count;
            }
            if (count == 0 && rng() % 50 == 0) rt.abort(id);
          }
        }
        for (auto& [id, count] : final_events) {
          if (count != 1) ++bad;
          ++finished;
          if (!rt.poll(id, 0.0).empty()) ++bad;  // nothing after the final event
        }
      }
    });
  for (auto& th : threads) th.join();
  done = true;
  stats_reader.join();
  CHECK(bad == 0);
  CHECK(finished == kThreads * ((kPerThread + 2) / 3) * 3);
  CHECK(rt.poll(0.0).empty());
  check_pool_back(rt);
  // Preemption depends on timing here (tests/test_soak.py asserts it); report it.
  std::printf("poll_by_id: %lld preemptions\n", static_cast<long long>(rt.stats().num_preemptions));
}

// Submitters, shared pollers (poll of any request) and an aborter, all at once.
void test_threads_shared_pollers() {
  Runtime rt(small_config(16));
  const int vocab = static_cast<int>(rt.model_info().vocab_size);
  const int kSubmitters = 4, kPerSubmitter = 25 * g_scale, kTotal = kSubmitters * kPerSubmitter;
  std::mutex mu;
  std::map<std::string, int> final_events;
  std::vector<std::string> ids;
  std::atomic<int> unknown{0}, seen_final{0};
  std::atomic<bool> submitting{true};
  std::vector<std::thread> threads;
  for (int t = 0; t < kSubmitters; ++t)
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < kPerSubmitter; ++i) {
        std::lock_guard<std::mutex> lk(mu);  // registered before a poller can see its events
        const std::string id = rt.submit(random_prompt(rng, vocab), random_params(rng, vocab));
        final_events.emplace(id, 0);
        ids.push_back(id);
      }
    });
  for (int t = 0; t < 3; ++t)
    threads.emplace_back([&] {
      const double deadline = now_s() + 180.0;
      while (seen_final < kTotal && now_s() < deadline)
        for (const Event& ev : rt.poll(0.01)) {
          std::lock_guard<std::mutex> lk(mu);
          auto it = final_events.find(ev.request_id);
          if (it == final_events.end()) { ++unknown; continue; }
          if (ev.request_finished) { ++it->second; ++seen_final; }
        }
    });
  threads.emplace_back([&] {  // the aborter
    std::mt19937 rng(99);
    const double deadline = now_s() + 180.0;
    while (seen_final < kTotal && now_s() < deadline) {
      std::string id;
      {
        std::lock_guard<std::mutex> lk(mu);
        if (!ids.empty()) id = ids[rng() % ids.size()];
      }
      if (!id.empty()) rt.abort(id);
      rt.abort("no-such-request");
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
  for (auto& th : threads) th.join();
  CHECK(unknown == 0);
  CHECK(static_cast<int>(final_events.size()) == kTotal);
  int exactly_once = 0;
  for (auto& kv : final_events) exactly_once += kv.second == 1;
  CHECK(exactly_once == kTotal);
  check_pool_back(rt);
}

// close() from another thread with requests running and queued, while pollers
// poll: every request ends with exactly one final event, readable after close.
void test_close_in_flight() {
  Runtime rt(small_config(40));
  const int vocab = static_cast<int>(rt.model_info().vocab_size);
  std::mt19937 rng(7);
  std::map<std::string, int> final_events;
  for (int i = 0; i < 30; ++i) {
    SamplingParams p;
    p.max_tokens = 400;  // seconds of work in all: most are still queued or running at close()
    p.ignore_eos = true;
    final_events[rt.submit(random_prompt(rng, vocab), p)] = 0;
  }
  std::mutex mu;
  std::atomic<bool> stop{false};
  std::atomic<int> aborted{0};
  std::vector<std::thread> pollers;
  for (int t = 0; t < 3; ++t)
    pollers.emplace_back([&] {
      while (!stop)
        for (const Event& ev : rt.poll(0.005)) {
          std::lock_guard<std::mutex> lk(mu);
          if (ev.request_finished) ++final_events[ev.request_id];
          if (ev.request_finished && ev.finish_reason == FinishReason::Abort) ++aborted;
        }
    });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  std::thread closer1([&] { rt.close(); });
  std::thread closer2([&] { rt.close(); });  // idempotent, from two threads at once
  closer1.join();
  closer2.join();
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  stop = true;
  for (auto& th : pollers) th.join();
  for (const Event& ev : rt.poll(0.0))
    if (ev.request_finished) ++final_events[ev.request_id];
  int exactly_once = 0;
  for (auto& kv : final_events) exactly_once += kv.second == 1;
  CHECK(exactly_once == 30);
  CHECK(aborted > 0);  // some were still in flight
  CHECK_THROWS(rt.submit({1, 2, 3}, SamplingParams()), ErrorKind::InvalidArgument, "closed");
  CHECK(!rt.abort("0"));
  CHECK(rt.poll(0.01).empty());
  check_pool_back(rt);
}

// The destructor alone (no close) with requests in flight and queued returns.
void test_destroy_in_flight() {
  const double t0 = now_s();
  {
    Runtime rt(small_config(16));
    std::mt19937 rng(3);
    const int vocab = static_cast<int>(rt.model_info().vocab_size);
    SamplingParams p;
    p.max_tokens = 200;
    p.ignore_eos = true;
    for (int i = 0; i < 20; ++i) rt.submit(random_prompt(rng, vocab), p);
    (void)rt.poll(0.02);
  }
  CHECK(now_s() - t0 < 60.0);
}

// Bad calls from many threads at once get errors, and the runtime keeps serving.
void test_bad_calls_concurrently() {
  Runtime rt(small_config(16));
  const int vocab = static_cast<int>(rt.model_info().vocab_size);
  std::atomic<int> errors{0};
  SamplingParams long_run;
  long_run.max_tokens = 200;
  long_run.ignore_eos = true;
  rt.submit({1}, long_run, "dup");  // live while the threads try to reuse its id
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < 20; ++i) {
        SamplingParams bad;
        bad.top_p = (i % 2) ? 0.0f : 1.0f;
        bad.max_tokens = (i % 2) ? 4 : 0;
        try { rt.submit({1}, bad); } catch (const Error&) { ++errors; }
        try { rt.submit({vocab + t}, SamplingParams()); } catch (const Error&) { ++errors; }
        try { rt.submit({}, SamplingParams()); } catch (const Error&) { ++errors; }
        try { rt.submit({1}, SamplingParams(), "dup"); } catch (const Error&) { ++errors; }
      }
    });
  for (auto& th : threads) th.join();
  CHECK(errors == 4 * 20 * 4);  // every call failed
  CHECK(rt.abort("dup"));
  SamplingParams greedy;
  greedy.temperature = 0;
  greedy.max_tokens = 3;
  greedy.ignore_eos = true;
  const std::string id = rt.submit({1, 2, 3}, greedy);
  int tokens = 0;
  bool finished = false;
  for (double end = now_s() + 30; !finished && now_s() < end;)
    for (const Event& ev : rt.poll(id, 0.05)) { tokens += static_cast<int>(ev.token_ids.size()); finished = ev.request_finished; }
  CHECK(finished && tokens == 3);
}

}  // namespace

int main() {
  const char* model = std::getenv("PAGEDRT_TEST_MODEL");
  if (model == nullptr || *model == '\0') return check::skip("PAGEDRT_TEST_MODEL is not set (a model folder)");
  g_model = model;
  if (const char* s = std::getenv("PAGEDRT_TEST_SCALE")) g_scale = std::max(1, std::atoi(s));
  test_threads_poll_by_id();
  test_threads_shared_pollers();
  test_close_in_flight();
  test_destroy_in_flight();
  test_bad_calls_concurrently();
  return check::finish();
}
