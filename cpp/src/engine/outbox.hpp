// engine/outbox.hpp — where events wait for the host threads that read them.
//
// Every request has a mailbox from submit() until its final event has been
// read. The routing rule (public: pagedrt/runtime.hpp, "Events"):
//
//   owned request (submitted Delivery::ById, or polled by id once)
//       its events go only to poll(id), in order;
//   any other request
//       its events go to poll() without an id, in emission order across
//       requests; the first poll(id) of the request takes its queued events
//       out of that shared queue and owns the request from then on;
//   released request (release(id): its reader is gone)
//       queued and later events are dropped; the mailbox closes with the
//       final event.
//
//   boxes_  id -> Mailbox{events (owned only), owned, ended, released}
//   shared_ events of requests that nobody owns, oldest first
//   ended_  the last kFinishedIds ids whose mailbox closed, so that abort()
//           can tell "finished" (false) from "never existed" (an error)
//
// One mutex guards all of it; the engine thread pushes, host threads poll.
// Pollers are woken once per engine iteration (notify()), not per event.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "pagedrt/event.hpp"

namespace pagedrt {

class Outbox {
 public:
  enum class State { Unknown, Running, Ended };

  // Opens a mailbox for a new request; false when `id` already has one.
  bool open(const std::string& id, bool owned);
  // Takes back open() for a request that never reached the engine.
  void discard(const std::string& id);
  // Running: its final event is still to come. Ended: it came (still queued
  // or read a moment ago), or the reader released the request. Unknown: no
  // such id among the live and the last kFinishedIds finished ones.
  State state(const std::string& id) const;
  // The reader is gone. Returns the state the request was in; a Running one
  // still needs ending by the engine.
  State release(const std::string& id);

  // Engine thread: queues an event where it belongs (see above).
  void push(Event ev);
  // Wakes pollers if anything was pushed since the last call.
  void notify();

  // Events of requests nobody owns, waiting up to `timeout_s` for the first.
  std::vector<Event> poll_any(double timeout_s);
  // Events of the requests `ids`, waiting up to `timeout_s` for the first;
  // owns them from now on. Each request's events stay in order. Throws
  // Error(InvalidArgument), before taking anything, for an id without a
  // mailbox (never submitted, finished and read, or released).
  std::vector<Event> poll(const std::vector<std::string>& ids, double timeout_s);

  static constexpr size_t kFinishedIds = 1 << 16;

 private:
  struct Mailbox {
    std::deque<Event> events;  // owned requests only
    bool owned = false;
    bool ended = false;        // the final event was pushed
    bool released = false;
  };
  // Closes a mailbox (mu_ held): its id counts as finished from now on.
  void close_mailbox(const std::string& id);
  // Takes every queued event of `id` out of shared_ into its mailbox (mu_ held).
  void claim(const std::string& id, Mailbox& box);

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::unordered_map<std::string, Mailbox> boxes_;
  std::deque<Event> shared_;
  std::unordered_map<std::string, uint64_t> ended_;     // id -> when it ended (a counter)
  std::deque<std::pair<std::string, uint64_t>> ended_order_;
  uint64_t ended_count_ = 0;
  bool pushed_ = false;  // since the last notify()
};

}  // namespace pagedrt
