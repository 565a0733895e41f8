// The one PYBIND11_MODULE: fastar._C.
#include <torch/extension.h>

#include "core/probe.h"
#include "core/schedule.h"
#include "core/shm.h"
#include "torch/backend_shim.h"
#include "torch/bucket_engine.h"
#include "torch/communicator.h"
#if __has_include("torch/kernels.h")
#include "torch/kernels.h"
#define FASTAR_HAS_KERNELS 1
#endif

namespace py = pybind11;
using fastar::Communicator;

static c10::intrusive_ptr<c10d::ProcessGroup> as_pg(const py::object& o) {
  if (o.is_none()) return {};
  return o.cast<c10::intrusive_ptr<c10d::ProcessGroup>>();
}

static py::list steps_py(const std::vector<fastar::Step>& steps) {
  py::list out;
  for (const auto& s : steps) {
    py::dict d;
    d["send_peer"] = s.send_peer;
    d["send"] = py::make_tuple(s.send.begin, s.send.end);
    d["recv_peer"] = s.recv_peer;
    d["recv"] = py::make_tuple(s.recv.begin, s.recv.end);
    d["reduce"] = s.reduce;
    out.append(d);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastar: hierarchical halving/doubling allreduce (compiled core)";

  // The plan crosses the binding as these enums (csrc/core/plan.h; fastar/policy.py names the
  // choices alike, and a test checks that they agree); their names are the ones fastar's API and
  // records use.
  py::enum_<fastar::Collective>(m, "Collective")
      .value("allreduce", fastar::Collective::Allreduce)
      .value("reduce_scatter", fastar::Collective::ReduceScatter)
      .value("allgather", fastar::Collective::Allgather);
  py::enum_<fastar::Protocol>(m, "Protocol")
      .value("latency", fastar::Protocol::Latency)
      .value("one_barrier", fastar::Protocol::OneBarrier)
      .value("chunked", fastar::Protocol::Chunked)
      .value("halves", fastar::Protocol::Halves)
      .value("in_place", fastar::Protocol::InPlace)
      .value("network", fastar::Protocol::Network)
      .value("single_copy", fastar::Protocol::SingleCopy);
  py::enum_<fastar::Algorithm>(m, "Algorithm")
      .value("halving_doubling", fastar::Algorithm::HalvingDoubling)
      .value("ring", fastar::Algorithm::Ring);
  py::enum_<fastar::Hierarchy>(m, "Hierarchy")
      .value("flat", fastar::Hierarchy::Flat)
      .value("leader", fastar::Hierarchy::Leader)
      .value("rail", fastar::Hierarchy::Rail);
  py::enum_<fastar::Wire>(m, "Wire")
      .value("none", fastar::Wire::None)
      .value("fp16", fastar::Wire::Fp16)
      .value("bf16", fastar::Wire::Bf16);

  py::class_<fastar::Plan>(m, "Plan")
      .def(py::init([](fastar::Collective c, fastar::Algorithm a, fastar::Hierarchy h, fastar::Protocol p,
                       int64_t chunk_bytes, fastar::Wire w, bool stream) {
             return fastar::Plan{c, a, h, p, chunk_bytes, w, stream};
           }),
           py::arg("collective"), py::arg("algorithm"), py::arg("hierarchy"), py::arg("protocol"),
           py::arg("chunk_bytes"), py::arg("wire"), py::arg("stream") = false)
      .def_readonly("collective", &fastar::Plan::collective)
      .def_readonly("algorithm", &fastar::Plan::algorithm)
      .def_readonly("hierarchy", &fastar::Plan::hierarchy)
      .def_readonly("protocol", &fastar::Plan::protocol)
      .def_readonly("chunk_bytes", &fastar::Plan::chunk_bytes)
      .def_readonly("wire", &fastar::Plan::wire)
      .def_readonly("stream", &fastar::Plan::stream)
      .def("__repr__", [](const fastar::Plan& p) {
        return "<fastar._C.Plan " + fastar::plan_label(p) + " chunk " + std::to_string(p.chunk_bytes) + ">";
      });
  m.attr("LATENCY_MAX_BYTES") = fastar::ShmArena::kSmallBytes;  // the small regions' size (policy.py checks it)
  py::register_exception<fastar::NotForFastar>(m, "NotForFastar", PyExc_ValueError);

  py::class_<fastar::AsyncWork, std::shared_ptr<fastar::AsyncWork>>(m, "AsyncWork")
      .def("wait", &fastar::AsyncWork::wait, py::arg("timeout_s"), py::call_guard<py::gil_scoped_release>())
      .def("is_completed", &fastar::AsyncWork::is_completed)
      .def_readonly("start_s", &fastar::AsyncWork::start_s)
      .def_readonly("end_s", &fastar::AsyncWork::end_s)
      .def_readonly("algorithm", &fastar::AsyncWork::algorithm);

  py::class_<Communicator, std::shared_ptr<Communicator>>(m, "Communicator")
      .def(py::init([](int rank, int size, int local_rank, int local_size, int node, int num_nodes, py::object world,
                       std::vector<int> world_ranks, py::object inter, std::vector<int> inter_ranks,
                       std::string shm_name, bool shm_create, int64_t shm_chunk_bytes, double timeout_s) {
             fastar::Topology t{rank, size, local_rank, local_size, node, num_nodes};
             auto w = as_pg(world);
             auto c = as_pg(inter);
             py::gil_scoped_release nogil;
             return std::make_shared<Communicator>(t, w, world_ranks, c, inter_ranks, shm_name, shm_create,
                                                   shm_chunk_bytes, timeout_s);
           }),
           py::arg("rank"), py::arg("size"), py::arg("local_rank"), py::arg("local_size"), py::arg("node"),
           py::arg("num_nodes"), py::arg("world"), py::arg("world_ranks"), py::arg("inter"), py::arg("inter_ranks"),
           py::arg("shm_name"), py::arg("shm_create"), py::arg("shm_chunk_bytes"), py::arg("timeout_s"))
      // The one entry of an allreduce: None when it ran inline, else the queued work. Called
      // positionally (tensor, plan, avg, validate, async_op) on the latency path: no keyword matching.
      .def("allreduce", &Communicator::allreduce, py::call_guard<py::gil_scoped_release>())
      .def("probe_single_copy", &Communicator::probe_single_copy, py::arg("want"),
           py::call_guard<py::gil_scoped_release>())
      .def("single_copy", &Communicator::single_copy)
      .def("set_latency_profile", &Communicator::set_latency_profile, py::arg("on"),
           py::call_guard<py::gil_scoped_release>())
      .def("latency_profile",
           [](Communicator& c) {
             fastar::LatencyProfile p;
             {
               py::gil_scoped_release nogil;  // waits for a running collective
               p = c.latency_profile();
             }
             py::dict d;
             d["calls"] = p.calls;
             d["checks_ns"] = p.checks_ns;
             d["copy_in_ns"] = p.copy_in_ns;
             d["wait_ns"] = p.wait_ns;
             d["reduce_copy_out_ns"] = p.reduce_ns;
             d["exit_ns"] = p.exit_ns;
             return d;
           })
      .def("reduce_scatter", &Communicator::reduce_scatter, py::arg("output"), py::arg("input"),
           py::arg("plan"), py::arg("avg"), py::arg("validate"), py::arg("async_op"),
           py::call_guard<py::gil_scoped_release>())
      .def("allgather", &Communicator::allgather, py::arg("output"), py::arg("input"), py::arg("plan"),
           py::arg("validate"), py::arg("async_op"), py::call_guard<py::gil_scoped_release>())
      .def("set_tensor_groups",
           [](Communicator& c, const std::string& device_type, py::object world, py::object local, py::object inter,
              std::vector<int> world_ranks, std::vector<int> inter_ranks) {
             fastar::TensorGroups g{as_pg(world), as_pg(local), as_pg(inter), std::move(world_ranks),
                                    std::move(inter_ranks)};
             py::gil_scoped_release nogil;  // waits for a running collective
             c.set_tensor_groups(device_type, std::move(g));
           },
           py::arg("device_type"), py::arg("world"), py::arg("local"), py::arg("inter"), py::arg("world_ranks"),
           py::arg("inter_ranks"))
      .def("has_tensor_groups", &Communicator::has_tensor_groups, py::arg("device_type"),
           py::call_guard<py::gil_scoped_release>())
      .def("unlink_shm", &Communicator::unlink_shm)
      .def("close", &Communicator::close, py::call_guard<py::gil_scoped_release>())
      // None of these waits for a running collective (fastar.set_timeout while a collective hangs).
      .def("set_timeout", &Communicator::set_timeout, py::arg("seconds"))
      .def("_fail_for_test", &Communicator::fail_for_test, py::arg("why"),
           "Test hook: fails the communicator (and marks its arenas) as a first error would.")
      .def("has_shm", &Communicator::has_shm)
      .def("shm_chunk_bytes", &Communicator::shm_chunk_bytes)
      .def("failed", [](Communicator& c) { return (bool)c.failure(); })
      .def("shm_name", &Communicator::shm_name)
      .def("last_op", [](Communicator& c) {
        auto r = c.last_op();
        py::dict d;
        d["hierarchy"] = hierarchy_name(r.hierarchy);
        d["algorithm"] = algorithm_name(r.algorithm);
        d["protocol"] = py::cast(r.protocol).attr("name");
        d["bytes"] = r.bytes;
        d["seconds"] = r.seconds;
        return d;
      });

  py::class_<fastar::BucketEngine, std::shared_ptr<fastar::BucketEngine>>(m, "BucketEngine")
      .def(py::init<std::shared_ptr<Communicator>, std::vector<at::Tensor>, std::vector<int64_t>, int64_t, int64_t,
                    bool>(),
           py::arg("comm"), py::arg("params"), py::arg("order"), py::arg("cap_bytes"), py::arg("first_cap_bytes"),
           py::arg("grad_as_bucket_view"))
      .def("rebuild", &fastar::BucketEngine::rebuild)
      .def("attach_arena", &fastar::BucketEngine::attach_arena, py::arg("name"), py::arg("create"),
           py::call_guard<py::gil_scoped_release>())
      .def("unlink_arena", &fastar::BucketEngine::unlink_arena)
      .def("detach_arena", &fastar::BucketEngine::detach_arena, py::call_guard<py::gil_scoped_release>())
      .def("has_arena", &fastar::BucketEngine::has_arena)
      .def("num_buckets", &fastar::BucketEngine::num_buckets)
      .def("bucket_bytes", &fastar::BucketEngine::bucket_bytes)
      .def("bucket_params", &fastar::BucketEngine::bucket_params)
      .def("set_plan", &fastar::BucketEngine::set_plan, py::arg("bucket"), py::arg("plan"))
      .def("mark_ready", &fastar::BucketEngine::mark_ready, py::call_guard<py::gil_scoped_release>())
      .def("missing", &fastar::BucketEngine::missing)
      .def("finalize", &fastar::BucketEngine::finalize, py::arg("fill_unused"),
           py::call_guard<py::gil_scoped_release>())
      .def("abandon", &fastar::BucketEngine::abandon, py::call_guard<py::gil_scoped_release>())
      .def("ready_order", &fastar::BucketEngine::ready_order)
      .def("in_iteration", &fastar::BucketEngine::in_iteration)
      .def("stats", &fastar::BucketEngine::stats);

  m.def("schedule", [](const std::string& algo, int rank, int size, int64_t count) {
    return steps_py(fastar::make_schedule(fastar::parse_algorithm(algo), rank, size, count));
  }, "The steps one rank performs (for tests and docs).");
  m.def("schedule_halves", [](const std::string& kind, const std::string& algo, int rank, int size, int64_t count) {
    if (kind != "reduce_scatter" && kind != "allgather")
      throw std::invalid_argument("fastar.schedule_halves: kind must be reduce_scatter or allgather, not " + kind);
    const auto a = fastar::parse_algorithm(algo);
    const auto steps = kind == "reduce_scatter" ? fastar::reduce_scatter_schedule(a, rank, size, count)
                                                : fastar::allgather_schedule(a, rank, size, count);
    return steps_py(steps);
  }, py::arg("kind"), py::arg("algorithm"), py::arg("rank"), py::arg("size"), py::arg("count"),
     "The steps of one half (kind: reduce_scatter or allgather) one rank performs (tests and docs).");
  m.def("remove_stale_shm", &fastar::ShmArena::remove_stale, py::arg("prefix"));
  m.def("pid_namespace", &fastar::ShmArena::pid_namespace);
  m.def("core_round_trip_ns", &fastar::core_round_trip_ns, py::arg("cpu_a"), py::arg("cpu_b"),
        py::arg("iters") = 100000, py::call_guard<py::gil_scoped_release>());
  m.def("_peer_alive", &fastar::ShmArena::peer_alive_for_test, py::arg("pid"), py::arg("start_ticks"),
        py::arg("pid_ns"), "Test hook: whether a shared-memory wait would consider this process alive.");
  m.def("_start_ticks", &fastar::ShmArena::start_ticks, py::arg("pid"));
  m.def("_open_segment",
        [](const std::string& name, bool create, int local_rank, int local_size, int64_t chunk_bytes) {
          fastar::ShmArena a(name, create, local_rank, local_size, chunk_bytes, 1.0);
          a.unlink();
        },
        py::arg("name"), py::arg("create"), py::arg("local_rank"), py::arg("local_size"), py::arg("chunk_bytes"),
        "Test hook: creates or opens (with every check) a staged-layout segment, then closes it.");
  m.def("_set_shm_reserve_limit", &fastar::ShmArena::set_reserve_limit, py::arg("bytes"),
        "Test hook: creating a shared-memory segment larger than this fails as a full /dev/shm would (-1: off).");
#ifdef FASTAR_HAS_KERNELS
  fastar::register_kernels(m);
#endif

  fastar::bind_backend_shim(m);  // the C++ Backend torch holds for a "fastar" process group
}
