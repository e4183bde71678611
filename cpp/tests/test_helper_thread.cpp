// test_helper_thread.cpp — the engine's kept helper thread
// (engine/helper_thread.hpp): jobs run on one thread, not the caller's, one
// after another in the order started (also when started before the one ahead
// was waited for); wait(ticket) returns after that job and rethrows its own
// exception; the destructor waits for jobs nobody waited for. Built plain,
// with ThreadSanitizer and with ASan+UBSan (tests/test_cpp.py).
#include <atomic>
#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "check.hpp"
#include "engine/helper_thread.hpp"

using namespace pagedrt;

namespace {

void test_jobs_run_on_one_kept_thread() {
  HelperThread helper;
  CHECK(!helper.pending());
  helper.wait();  // nothing started: returns at once
  std::vector<std::thread::id> ids;
  std::vector<int> order;
  for (int i = 0; i < 200; ++i) {
    helper.start([&, i] {
      ids.push_back(std::this_thread::get_id());
      order.push_back(i);
    });
    CHECK(helper.pending());
    helper.wait();  // the job's writes are seen after it
    CHECK(!helper.pending());
    CHECK(order.size() == static_cast<size_t>(i) + 1 && order.back() == i);
  }
  bool one_thread = true;
  for (const std::thread::id& id : ids) one_thread = one_thread && id == ids.front();
  CHECK(one_thread);
  CHECK(ids.front() != std::this_thread::get_id());
}

void test_the_caller_runs_while_the_job_does() {
  HelperThread helper;
  std::atomic<bool> release{false}, running{false};
  helper.start([&] {
    running = true;
    while (!release) std::this_thread::yield();
  });
  while (!running) std::this_thread::yield();  // start() returned while the job runs
  release = true;
  helper.wait();
  CHECK(!helper.pending());
}

void test_errors_are_rethrown_once() {
  HelperThread helper;
  helper.start([] { throw std::runtime_error("mask fill failed: row 3"); });
  std::string what;
  try {
    helper.wait();
  } catch (const std::runtime_error& e) {
    what = e.what();
  }
  CHECK(what == "mask fill failed: row 3");
  helper.wait();  // the error was reported; nothing pending
  int ran = 0;
  helper.start([&] { ++ran; });  // the thread serves again
  helper.wait();
  CHECK(ran == 1);
}

void test_jobs_started_before_a_wait_run_in_order() {
  // A job started while the one before runs is queued: the thread takes it as
  // soon as that one returns (chained fills), each waited for by its ticket.
  HelperThread helper;
  std::atomic<bool> release{false};
  std::vector<int> order;
  const uint64_t a = helper.start([&] {
    while (!release) std::this_thread::yield();
    order.push_back(1);
  });
  const uint64_t b = helper.start([&] { order.push_back(2); });
  const uint64_t c = helper.start([&] { throw std::runtime_error("fill failed: step 3"); });
  CHECK(a + 1 == b && b + 1 == c);
  CHECK(helper.pending());
  release = true;
  helper.wait(b);  // b's wait returns after a's job, which ran first; a is still unwaited
  CHECK(order.size() == 2 && order[0] == 1 && order[1] == 2);
  CHECK(helper.pending());
  std::string what;
  try {
    helper.wait(c);  // its own error, not another's
  } catch (const std::runtime_error& e) {
    what = e.what();
  }
  CHECK(what == "fill failed: step 3");
  CHECK(helper.pending());  // a not waited for yet
  helper.wait(a);
  CHECK(!helper.pending());
  helper.wait(c);  // waited already: returns, nothing rethrown
  // wait() for all: the first error among the unwaited jobs
  const uint64_t d = helper.start([] { throw std::runtime_error("first"); });
  helper.start([] { throw std::runtime_error("second"); });
  what.clear();
  try {
    helper.wait();
  } catch (const std::runtime_error& e) {
    what = e.what();
  }
  CHECK(what == "first");
  CHECK(!helper.pending());
  helper.wait(d);  // reported by wait(): nothing left
  int ran = 0;
  for (int i = 0; i < 100; ++i) helper.start([&] { ++ran; });
  helper.wait();
  CHECK(ran == 100);
}

void test_destructor_waits_for_an_unwaited_job() {
  std::atomic<int> done{0};
  {
    HelperThread helper;
    helper.start([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      ++done;
    });
  }
  CHECK(done == 1);
  {
    HelperThread helper;  // an unwaited job that threw: no exception leaves the destructor
    helper.start([&] {
      ++done;
      throw std::runtime_error("dropped");
    });
  }
  CHECK(done == 2);
}

}  // namespace

int main() {
  test_jobs_run_on_one_kept_thread();
  test_the_caller_runs_while_the_job_does();
  test_errors_are_rethrown_once();
  test_jobs_started_before_a_wait_run_in_order();
  test_destructor_waits_for_an_unwaited_job();
  return check::finish();
}
