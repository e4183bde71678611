// test_runtime_threads.cpp — the public Runtime under concurrency: many threads
// submitting, polling and aborting at once; close() and destruction with
// requests in flight. Built plain, with ThreadSanitizer and with ASan+UBSan
// (tests/test_cpp.py). Needs a model folder in PAGEDRT_TEST_MODEL (a tiny
// random Llama from tests/conftest.py); exits 77 (skipped) without one.
// PAGEDRT_TEST_SCALE (default 1) multiplies the request counts. Some tests
// run again with tensor_parallel_size 2: the ranks' threads and collectives
// beside the callers' threads.
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <chrono>
#include <cstdlib>
#include <functional>
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
int g_tp = 1;  // tensor_parallel_size of small_config's runtimes

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
  c.tensor_parallel_size = g_tp;
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
          // Nothing after the final event: the id is closed once it was read.
          CHECK_THROWS(rt.poll(id, 0.0), ErrorKind::InvalidArgument, "has finished");
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
      if (!id.empty()) rt.abort(id);  // true while it runs, false once it ended; never throws
      CHECK_THROWS(rt.abort("no-such-request"), ErrorKind::InvalidArgument, "unknown request id");
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

// The routing rule under every kind of caller at once: threads that submit
// Delivery::ById and poll their ids, threads that submit Delivery::Any and
// poll() without an id, an aborter and a stats reader. Each caller must see
// exactly its own requests' events, one final event each, and tokens equal to
// the same request run alone (greedy or seeded), or a prefix when aborted.
void test_mixed_callers() {
  RuntimeConfig config = small_config(24);
  config.activation_dtype = "float32";  // the alone runs and the crowded runs round alike
  Runtime rt(config);
  const int vocab = static_cast<int>(rt.model_info().vocab_size);
  struct Req { std::vector<int32_t> prompt; SamplingParams params; std::vector<int32_t> alone; };
  std::vector<Req> reqs;
  std::mt19937 rng(42);
  for (int i = 0; i < 16; ++i) {
    Req r;
    r.prompt = random_prompt(rng, vocab);
    r.params.max_tokens = 1 + static_cast<int>(rng() % 12);
    r.params.ignore_eos = true;
    r.params.temperature = (i % 2) ? 0.0f : 0.9f;
    r.params.has_seed = true;
    r.params.seed = 7 + i;
    const std::string id = rt.submit(r.prompt, r.params, "", Delivery::ById);
    for (bool done = false; !done;)
      for (const Event& ev : rt.poll(id, 1.0)) {
        r.alone.insert(r.alone.end(), ev.token_ids.begin(), ev.token_ids.end());
        done = ev.request_finished;
      }
    reqs.push_back(std::move(r));
  }
  std::mutex mu;
  std::vector<std::string> all_ids;  // for the aborter
  std::atomic<int> bad{0}, checked{0}, stopped{0};
  // Reads until each of `mine` (id -> request index) has its final event; `poll` is
  // the caller's own kind of poll. Checks the tokens against the alone run.
  auto read_all = [&](std::map<std::string, int> mine, const std::function<std::vector<Event>()>& poll) {
    std::map<std::string, std::vector<int32_t>> tokens;
    std::map<std::string, FinishReason> reasons;
    const double deadline = now_s() + 120.0;
    while (reasons.size() < mine.size() && now_s() < deadline)
      for (const Event& ev : poll()) {
        if (!mine.count(ev.request_id) || reasons.count(ev.request_id)) { ++bad; continue; }
        tokens[ev.request_id].insert(tokens[ev.request_id].end(), ev.token_ids.begin(), ev.token_ids.end());
        if (ev.request_finished) reasons[ev.request_id] = ev.finish_reason;
      }
    for (const auto& [id, k] : mine) {
      const std::vector<int32_t>& got = tokens[id];
      const std::vector<int32_t>& want = reqs[k].alone;
      auto it = reasons.find(id);
      if (it == reasons.end()) { ++bad; continue; }
      const bool prefix = got.size() <= want.size() && std::equal(got.begin(), got.end(), want.begin());
      if (!prefix || (it->second == FinishReason::Length && got.size() != want.size())) ++bad;
      if (it->second != FinishReason::Length && it->second != FinishReason::Abort) ++bad;
      stopped += it->second == FinishReason::Abort;
      ++checked;
    }
  };
  auto submit_some = [&](std::mt19937& g, Delivery d) {
    std::map<std::string, int> mine;
    for (int j = 0, n = 1 + static_cast<int>(g() % 3); j < n; ++j) {
      const int k = static_cast<int>(g() % reqs.size());
      const std::string id = rt.submit(reqs[k].prompt, reqs[k].params, "", d);
      mine[id] = k;
      std::lock_guard<std::mutex> lk(mu);
      all_ids.push_back(id);
    }
    return mine;
  };
  const int kRounds = 6 * g_scale;
  std::atomic<int> running{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 3; ++t)  // Delivery::ById + poll(id), one request at a time
    threads.emplace_back([&, t] {
      ++running;
      std::mt19937 g(100 + t);
      for (int round = 0; round < kRounds; ++round)
        for (const auto& [id, k] : submit_some(g, Delivery::ById)) {
          const std::string rid = id;
          read_all({{rid, k}}, [&] { return rt.poll(rid, 0.01); });
        }
      --running;
    });
  for (int t = 0; t < 2; ++t)  // Delivery::Any + poll() without an id
    threads.emplace_back([&, t] {
      ++running;
      std::mt19937 g(200 + t);
      for (int round = 0; round < kRounds; ++round) {
        // One poll()-er at a time per batch: two of them would share each other's events.
        static std::mutex any_mu;
        std::lock_guard<std::mutex> lk(any_mu);
        read_all(submit_some(g, Delivery::Any), [&] { return rt.poll(0.01); });
      }
      --running;
    });
  threads.emplace_back([&] {  // the aborter and stats reader
    std::mt19937 g(300);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    while (running > 0) {
      std::string id;
      {
        std::lock_guard<std::mutex> lk(mu);
        // one of the newest few: most likely still running
        if (!all_ids.empty()) id = all_ids[all_ids.size() - 1 - g() % std::min<size_t>(4, all_ids.size())];
      }
      if (!id.empty() && g() % 2 == 0) (void)rt.abort(id);
      (void)rt.stats();
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  });
  for (auto& th : threads) th.join();
  CHECK(bad == 0);
  CHECK(checked == static_cast<int>(all_ids.size()));
  CHECK(rt.poll(0.0).empty());
  check_pool_back(rt);
  std::printf("mixed_callers: %d requests checked, %d aborted\n", checked.load(), stopped.load());
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

// Speculative requests (n-gram, and the model as its own draft model) mixed
// with plain ones from several threads, in pools small enough to preempt, with
// aborts: every request ends once, and both pools are empty at the end.
void test_threads_speculative() {
  RuntimeConfig config = small_config(12);
  config.kv_cache_bytes *= 2;  // room for the draft's 12 blocks too (the same model)
  config.draft_model = g_model;
  Runtime rt(config);
  CHECK(rt.stats().num_blocks == 12);
  const int vocab = static_cast<int>(rt.model_info().vocab_size);
  const int kThreads = 6, kPerThread = 8 * g_scale;
  std::atomic<int> finished{0}, bad{0};
  std::atomic<int64_t> accepted{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      std::mt19937 rng(500 + t);
      for (int i = 0; i < kPerThread; ++i) {
        SamplingParams p = random_params(rng, vocab);
        p.speculative = (i % 3 == 0) ? "" : (i % 3 == 1) ? "ngram" : "draft";
        p.num_speculative_tokens = 1 + static_cast<int>(rng() % 6);
        p.max_tokens += 8;
        std::vector<int32_t> base = random_prompt(rng, vocab), prompt;
        base.resize(std::min<size_t>(base.size(), 20));
        for (int r = 0; r < 3; ++r) prompt.insert(prompt.end(), base.begin(), base.end());  // repeats: n-grams match
        const std::string id = rt.submit(prompt, p, "s" + std::to_string(t) + "-" + std::to_string(i));
        if (rng() % 6 == 0) rt.abort(id);
        int finals = 0;
        for (double end = now_s() + 120; finals == 0 && now_s() < end;)
          for (const Event& ev : rt.poll(id, 0.05)) {
            if (ev.spec_accepted > ev.spec_proposed) ++bad;
            if (ev.request_finished) {
              ++finals;
              accepted += ev.spec_accepted;
            }
          }
        if (finals != 1) ++bad;
        ++finished;
      }
    });
  for (auto& th : threads) th.join();
  CHECK(bad == 0);
  CHECK(finished == kThreads * kPerThread);
  check_pool_back(rt);
  CHECK(rt.stats().draft_blocks_used == 0);
  CHECK(accepted > 0);
  std::printf("speculative: %lld preemptions, %lld of %lld proposals accepted\n",
              static_cast<long long>(rt.stats().num_preemptions), static_cast<long long>(rt.stats().spec_accepted),
              static_cast<long long>(rt.stats().spec_proposed));
}

}  // namespace

int main() {
  const char* model = std::getenv("PAGEDRT_TEST_MODEL");
  if (model == nullptr || *model == '\0') return check::skip("PAGEDRT_TEST_MODEL is not set (a model folder)");
  g_model = model;
  if (const char* s = std::getenv("PAGEDRT_TEST_SCALE")) g_scale = std::max(1, std::atoi(s));
  test_threads_poll_by_id();
  test_threads_shared_pollers();
  test_mixed_callers();
  test_close_in_flight();
  test_destroy_in_flight();
  test_bad_calls_concurrently();
  test_threads_speculative();
  g_tp = 2;
  test_threads_poll_by_id();
  test_close_in_flight();
  test_destroy_in_flight();
  return check::finish();
}
