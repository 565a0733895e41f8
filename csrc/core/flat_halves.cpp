#include "flat_halves.h"

#include <cstring>
#include <memory>

#include "failure.h"

namespace fastar {

int64_t flat_halves(bool scatter, Executor& exec, Transport& tr, Algorithm algo, const void* in, void* out,
                    int64_t shard, DType t, uint64_t seq) {
  const int r = tr.rank(), S = tr.size();
  const size_t es = dtype_size(t);
  const int64_t count = (int64_t)S * shard;
  exec.set_tag_base((uint32_t)(seq & 0x3FF) << 20);
  if (!scatter) {
    char* o = static_cast<char*>(out);
    if (shard > 0) std::memcpy(o + (int64_t)r * shard * es, in, shard * es);
    return exec.run(allgather_schedule(algo, r, S, count), tr, o, count, t).bytes_sent;
  }
  // The schedule sums in place: a copy of the input, so that the caller's stays as it was.
  std::shared_ptr<char[]> work(new char[count * es + 1]);
  if (count > 0) std::memcpy(work.get(), in, count * es);
  try {
    const int64_t sent = exec.run(reduce_scatter_schedule(algo, r, S, count), tr, work.get(), count, t).bytes_sent;
    if (shard > 0) std::memcpy(out, work.get() + (int64_t)r * shard * es, shard * es);
    return sent;
  } catch (...) {
    keep_forever(work);
    throw;
  }
}

}  // namespace fastar
