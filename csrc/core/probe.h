// Probes of the host for the benchmarks (bench/allreduce_bw.py records them with every run).
#pragma once

namespace fastar {

// Two threads pinned to cpu_a and cpu_b bounce a flag `iters` times: the mean round trip in ns
// (whether the two cores share a cache). -1 if a thread cannot be pinned there.
double core_round_trip_ns(int cpu_a, int cpu_b, int iters);

}  // namespace fastar
