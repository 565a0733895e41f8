// The halves with no local phase (one rank per node, so no shared-memory arena): the schedule's
// half over the world transport, the whole buffer at once. The hierarchical halves go through the
// driver (Hierarchical::reduce_scatter / allgather); these are the flat route of the same calls,
// kept out of the binding so that Communicator only checks and dispatches.
#pragma once
#include <cstdint>

#include "executor.h"

namespace fastar {

// reduce_scatter: `out` (shard elements) gets the sum over the transport's ranks of shard `rank` of
// `in` (size * shard elements, left as it was: the schedule sums in a copy). allgather: `out`
// (size * shard) gets every rank's `in` (shard) at its place; t may be Bytes. `algo`: the half's
// algorithm as it runs (halves_algorithm, the caller's choice). `seq` separates the call's
// messages from the previous ones' (the executor's tag base). Returns the bytes this rank sent.
// On a failure the copy is kept for good (keep_forever): a receive may still be posted into it.
int64_t flat_halves(bool scatter, Executor& exec, Transport& tr, Algorithm algo, const void* in, void* out,
                    int64_t shard, DType t, uint64_t seq);

}  // namespace fastar
