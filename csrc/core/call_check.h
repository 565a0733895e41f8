// What ranks must agree on for one collective: the call descriptor. Local ranks compare it through
// the node's arena (ShmArena::publish_desc / check_desc, and the latency path's check word); ranks
// on other nodes exchange it as a header before any data moves (HeaderExchange). It carries every
// setting that decides what a rank reads and writes (the protocol and its chunk), not only the
// call, so that ranks tuned differently raise on every rank instead of summing garbage.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "plan.h"
#include "transport.h"

namespace fastar {

// "ranks disagree on the <field> of <what>: <me> has <v>, <them> has <w>. <what to do>"
std::string desc_mismatch(const uint64_t mine[kDescWords], const uint64_t theirs[kDescWords], const char* what,
                          const std::string& me, const std::string& them);

// A plan this side cannot run (fastar/policy.py planned it wrong): std::invalid_argument before
// anything runs, "fastar: the plan <label> cannot run <what> here: <why> (...)". The one message of
// every refusal (Communicator, Hierarchical, the single-copy halves).
[[noreturn]] void refuse_plan(const Plan& plan, const std::string& what, const std::string& why);

// The latency path's 32-bit check of a descriptor, stored with block 0's generation in one word:
// count (17 bits), dtype (3), route (3) exactly, and the low 9 bits of seq. Exact where it matters:
// two calls that differ in count, dtype or route never share a check word. Protocol and chunk
// (block size) are fixed for the latency path. Needs count < 2^17 (the path takes at most 64 KiB).
uint32_t latency_check_word(const uint64_t desc[kDescWords]);

// The header exchange with the peers of a schedule. The buffers posted to the transport belong to
// this object; when an exchange fails with receives or sends still posted (a peer slower than the
// timeout), they are handed to keep_forever, so that a late peer never writes into freed memory.
class HeaderExchange {
 public:
  // Sends `mine` to every peer and receives theirs (tag: the message tag); throws the transport's
  // error, or the first mismatch (who(peer): how errors name a peer).
  void run(Transport& tr, const std::vector<int>& peers, const uint64_t mine[kDescWords], uint32_t tag,
           const char* what, const std::function<std::string(int)>& who);

 private:
  struct Buffers {
    std::vector<uint64_t> send, recv;
  };
  std::shared_ptr<Buffers> buf_ = std::make_shared<Buffers>();
};

}  // namespace fastar
