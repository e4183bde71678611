// test_collectives.cpp — tensor parallelism's in-memory collectives
// (backend/collectives.hpp) and rank threads (engine/rank_threads.hpp): every
// rank gets the rank-order sum bit for bit, rank 0 the gathered columns; a
// rank that throws makes the others give up instead of waiting (no hang), its
// error is the one reported, and the group serves again after recover().
// Built plain, with ThreadSanitizer and with ASan+UBSan (tests/test_cpp.py).
#include <cmath>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include "backend/collectives.hpp"
#include "check.hpp"
#include "engine/rank_threads.hpp"

using namespace pagedrt;

namespace {

Tensor host_floats(const std::vector<float>& v) {
  Tensor t = host_empty({static_cast<int64_t>(v.size())}, ScalarType::F32);
  std::memcpy(t.data, v.data(), v.size() * 4);
  return t;
}

void test_all_reduce_rank_order(int size, ScalarType dtype) {
  const int64_t n = 1000;
  std::mt19937 rng(static_cast<unsigned>(size));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<std::vector<float>> values(static_cast<size_t>(size), std::vector<float>(n));
  for (auto& v : values)
    for (float& x : v) x = dtype == ScalarType::BF16 ? bf16_to_f32(f32_to_bf16(normal(rng) * 100.0f)) : normal(rng) * 100.0f;
  // the expected bits: an fp32 sum in rank order, rounded once
  std::vector<float> want(n);
  for (int64_t i = 0; i < n; ++i) {
    float s = values[0][static_cast<size_t>(i)];
    for (int r = 1; r < size; ++r) s += values[static_cast<size_t>(r)][static_cast<size_t>(i)];
    want[static_cast<size_t>(i)] = dtype == ScalarType::BF16 ? bf16_to_f32(f32_to_bf16(s)) : s;
  }
  HostGroup group(size);
  std::vector<std::unique_ptr<Collectives>> comms;
  std::vector<Tensor> xs;
  for (int r = 0; r < size; ++r) {
    comms.push_back(group.rank(r));
    Tensor t = host_empty({n}, dtype);
    for (int64_t i = 0; i < n; ++i) {
      const float v = values[static_cast<size_t>(r)][static_cast<size_t>(i)];
      if (dtype == ScalarType::F32)
        t.as<float>()[i] = v;
      else
        t.as<uint16_t>()[i] = f32_to_bf16(v);
    }
    xs.push_back(t);
  }
  RankThreads threads(size);
  for (int round = 0; round < 3; ++round) {  // the group is reused: its barrier counts rounds
    if (round > 0)  // the sums again, from each rank's own values
      for (int r = 0; r < size; ++r)
        for (int64_t i = 0; i < n; ++i) {
          const float v = values[static_cast<size_t>(r)][static_cast<size_t>(i)];
          if (dtype == ScalarType::F32)
            xs[static_cast<size_t>(r)].as<float>()[i] = v;
          else
            xs[static_cast<size_t>(r)].as<uint16_t>()[i] = f32_to_bf16(v);
        }
    threads.run([&](int r) { comms[static_cast<size_t>(r)]->all_reduce_sum(xs[static_cast<size_t>(r)], n); }, [] {});
    for (int r = 0; r < size; ++r)
      for (int64_t i = 0; i < n; ++i) {
        const float got = dtype == ScalarType::F32 ? xs[static_cast<size_t>(r)].as<float>()[i]
                                                   : bf16_to_f32(xs[static_cast<size_t>(r)].as<uint16_t>()[i]);
        CHECK(std::memcmp(&got, &want[static_cast<size_t>(i)], 4) == 0);
      }
  }
}

void test_gather_columns_with_padding() {
  // 3 rows, a vocabulary of 10 over 4 ranks of 3 columns: the last rank's
  // third column is padding and is dropped
  const int size = 4;
  const int64_t rows = 3, cols = 3, vocab = 10;
  HostGroup group(size);
  std::vector<std::unique_ptr<Collectives>> comms;
  std::vector<Tensor> parts;
  for (int r = 0; r < size; ++r) {
    comms.push_back(group.rank(r));
    std::vector<float> p(static_cast<size_t>(rows * cols));
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t c = 0; c < cols; ++c) p[static_cast<size_t>(i * cols + c)] = float(i * 100 + r * cols + c);
    parts.push_back(host_floats(p));
  }
  Tensor out = host_floats(std::vector<float>(static_cast<size_t>(rows * vocab), -1.0f));
  Tensor unused = host_floats(std::vector<float>(static_cast<size_t>(rows * vocab), -1.0f));
  RankThreads threads(size);
  Tensor no_scratch;  // the in-memory gather takes none
  CHECK(comms[0]->gather_scratch(rows, cols) == 0);
  threads.run(
      [&](int r) {
        comms[static_cast<size_t>(r)]->gather_columns(parts[static_cast<size_t>(r)], rows, cols, r == 0 ? out : unused,
                                                      vocab, no_scratch);
      },
      [] {});
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = 0; c < vocab; ++c) CHECK(out.as<float>()[i * vocab + c] == float(i * 100 + c));
  for (int64_t i = 0; i < rows * vocab; ++i) CHECK(unused.as<float>()[i] == -1.0f);  // others' out untouched
}

void test_failed_rank_does_not_hang() {
  const int size = 4;
  const int64_t n = 16;
  HostGroup group(size);
  std::vector<std::unique_ptr<Collectives>> comms;
  std::vector<Tensor> xs;
  for (int r = 0; r < size; ++r) {
    comms.push_back(group.rank(r));
    xs.push_back(host_floats(std::vector<float>(n, float(r + 1))));
  }
  RankThreads threads(size);
  std::string message;
  try {
    threads.run(
        [&](int r) {
          comms[static_cast<size_t>(r)]->all_reduce_sum(xs[static_cast<size_t>(r)], n);
          if (r == 2) throw Error(ErrorKind::Runtime, "rank 2 failed here");
          // the others wait for rank 2 in the next collective
          comms[static_cast<size_t>(r)]->all_reduce_sum(xs[static_cast<size_t>(r)], n);
        },
        [&] { comms[0]->abort(); });
  } catch (const Error& e) {
    message = e.what();
  }
  CHECK(message == "rank 2 failed here");
  // a collective before recover() fails at once
  CHECK_THROWS(comms[1]->all_reduce_sum(xs[1], n), ErrorKind::Runtime, "tensor-parallel step aborted");
  comms[0]->recover();
  for (int r = 0; r < size; ++r) std::fill(xs[static_cast<size_t>(r)].as<float>(), xs[static_cast<size_t>(r)].as<float>() + n, 1.0f);
  threads.run([&](int r) { comms[static_cast<size_t>(r)]->all_reduce_sum(xs[static_cast<size_t>(r)], n); },
              [&] { comms[0]->abort(); });
  for (int r = 0; r < size; ++r) CHECK(xs[static_cast<size_t>(r)].as<float>()[n - 1] == float(size));
}

}  // namespace

int main() {
  for (int size : {2, 4, 8}) {
    test_all_reduce_rank_order(size, ScalarType::F32);
    test_all_reduce_rank_order(size, ScalarType::BF16);
  }
  test_gather_columns_with_padding();
  test_failed_rank_does_not_hang();
  return check::finish();
}
