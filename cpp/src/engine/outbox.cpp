#include "engine/outbox.hpp"

#include <algorithm>
#include <chrono>

#include "pagedrt/error.hpp"

namespace pagedrt {

bool Outbox::open(const std::string& id, bool owned) {
  std::lock_guard<std::mutex> lk(mu_);
  if (boxes_.count(id)) return false;
  ended_.erase(id);  // a reused id: its old ended_order_ entry no longer matches
  boxes_[id].owned = owned;
  return true;
}

void Outbox::discard(const std::string& id) {
  std::lock_guard<std::mutex> lk(mu_);
  boxes_.erase(id);
}

Outbox::State Outbox::state(const std::string& id) const {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = boxes_.find(id);
  if (it != boxes_.end()) return it->second.ended || it->second.released ? State::Ended : State::Running;
  return ended_.count(id) ? State::Ended : State::Unknown;
}

Outbox::State Outbox::release(const std::string& id) {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = boxes_.find(id);
  if (it == boxes_.end()) return ended_.count(id) ? State::Ended : State::Unknown;
  Mailbox& box = it->second;
  if (box.released) return State::Ended;
  // Drop what is queued: the box's own events, or this request's in the shared queue.
  box.events.clear();
  if (!box.owned)
    shared_.erase(std::remove_if(shared_.begin(), shared_.end(), [&](const Event& e) { return e.request_id == id; }),
                  shared_.end());
  if (box.ended) {  // its final event was queued: nothing more will come
    close_mailbox(id);
    return State::Ended;
  }
  box.released = true;  // push() drops the rest and closes the box with the final event
  return State::Running;
}

void Outbox::push(Event ev) {
  std::lock_guard<std::mutex> lk(mu_);
  pushed_ = true;
  auto it = boxes_.find(ev.request_id);
  if (it == boxes_.end()) {  // not opened through open() (never in the Runtime): nobody owns it
    shared_.push_back(std::move(ev));
    return;
  }
  Mailbox& box = it->second;
  const bool last = ev.request_finished;
  if (box.released) {
    if (last) close_mailbox(ev.request_id);
    return;
  }
  box.ended = box.ended || last;
  (box.owned ? box.events : shared_).push_back(std::move(ev));
}

void Outbox::notify() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (!pushed_) return;
    pushed_ = false;
  }
  cv_.notify_all();
}

std::vector<Event> Outbox::poll_any(double timeout_s) {
  std::unique_lock<std::mutex> lk(mu_);
  if (timeout_s > 0)
    cv_.wait_for(lk, std::chrono::duration<double>(timeout_s), [&] { return !shared_.empty(); });
  std::vector<Event> out(std::make_move_iterator(shared_.begin()), std::make_move_iterator(shared_.end()));
  shared_.clear();
  for (const Event& e : out)
    if (e.request_finished && boxes_.count(e.request_id)) close_mailbox(e.request_id);
  return out;
}

std::vector<Event> Outbox::poll(const std::vector<std::string>& ids, double timeout_s) {
  std::unique_lock<std::mutex> lk(mu_);
  for (const std::string& id : ids) {
    auto it = boxes_.find(id);
    if (it == boxes_.end() || it->second.released) {
      const bool ended = it != boxes_.end() || ended_.count(id);
      throw Error(ErrorKind::InvalidArgument,
                  ended ? "request '" + id + "' has finished: its final event was read or the request released"
                        : "unknown request id '" + id + "'");
    }
  }
  for (const std::string& id : ids) {
    Mailbox& box = boxes_.at(id);
    if (!box.owned) claim(id, box);
  }
  // A box may go meanwhile: another poller of the same id read its final event.
  auto ready = [&] {
    return std::any_of(ids.begin(), ids.end(), [&](const std::string& id) {
      auto b = boxes_.find(id);
      return b == boxes_.end() || !b->second.events.empty();
    });
  };
  if (timeout_s > 0) cv_.wait_for(lk, std::chrono::duration<double>(timeout_s), ready);
  std::vector<Event> out;
  for (const std::string& id : ids) {
    auto it = boxes_.find(id);
    if (it == boxes_.end() || it->second.events.empty()) continue;
    const bool last = it->second.events.back().request_finished;
    out.insert(out.end(), std::make_move_iterator(it->second.events.begin()),
               std::make_move_iterator(it->second.events.end()));
    it->second.events.clear();
    if (last) close_mailbox(id);
  }
  return out;
}

void Outbox::claim(const std::string& id, Mailbox& box) {
  box.owned = true;
  std::deque<Event> rest;
  for (Event& e : shared_) (e.request_id == id ? box.events : rest).push_back(std::move(e));
  shared_.swap(rest);
}

void Outbox::close_mailbox(const std::string& id) {
  boxes_.erase(id);
  ended_[id] = ++ended_count_;
  ended_order_.emplace_back(id, ended_count_);
  while (ended_order_.size() > kFinishedIds) {
    auto old = ended_.find(ended_order_.front().first);
    if (old != ended_.end() && old->second == ended_order_.front().second) ended_.erase(old);
    ended_order_.pop_front();
  }
}

}  // namespace pagedrt
