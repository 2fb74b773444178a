// kompakt-tvm-runner: run a kompakt TVM bundle (model.so + params.ktns) on the CPU.
//
//   kompakt-tvm-runner BUNDLE_DIR INPUTS.ktns OUTPUTS.ktns [--repeat N]
//
// Loads BUNDLE_DIR/model.so (a Relax executable), calls main(inputs..., params...) N times
// (default 1), writes the outputs of the last call as output_0, output_1, ... to OUTPUTS.ktns
// and prints {"median_ms": ..., "runs": N, "threads": TVM's worker threads, "peak_rss_bytes": ...,
// "ms": [each call, in order]}
// on stdout (peak RSS: the process's VmHWM; under qemu that of the emulator). KTNS is described in docs/formats.md.
// Threads: TVM_NUM_THREADS, else one per core the process may run on.
// Errors go to stderr with exit code 1 (2 for bad usage).

#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <sched.h>

namespace ffi = tvm::ffi;

namespace {

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// KTNS dtype names and their DLPack types (bool is one byte per element, as in numpy).
const std::vector<std::pair<std::string, DLDataType>> kDTypes = {
    {"float32", {kDLFloat, 32, 1}}, {"float16", {kDLFloat, 16, 1}}, {"float64", {kDLFloat, 64, 1}},
    {"int64", {kDLInt, 64, 1}},     {"int32", {kDLInt, 32, 1}},     {"int8", {kDLInt, 8, 1}},
    {"uint8", {kDLUInt, 8, 1}},     {"bool", {kDLBool, 8, 1}},
};

std::string DTypeName(DLDataType t) {
  if (t.lanes == 1 && ((t.code == kDLUInt && t.bits == 1) || (t.code == kDLBool && t.bits == 8)))
    return "bool";
  for (const auto& [name, dt] : kDTypes)
    if (dt.code == t.code && dt.bits == t.bits && dt.lanes == t.lanes) return name;
  throw Failure("output has dtype " + std::string(ffi::DLDataTypeToString(t)) +
                ", which KTNS cannot store");
}

// 64-byte aligned CPU buffers, as TVM kernels expect.
struct AlignedAlloc {
  void AllocData(DLTensor* t) {
    size_t n = (std::max<size_t>(ffi::GetDataSize(*t), 1) + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, n);
    if (t->data == nullptr) throw Failure("out of memory allocating a tensor");
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

struct Named {
  std::string name;
  ffi::Tensor tensor;
};

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Failure(path + ": cannot open file");
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

// A bounds-checked little-endian reader over a file's bytes.
struct Reader {
  const std::string& path;
  const std::string& buf;
  size_t pos = 0;

  const char* Take(uint64_t n) {
    if (n > buf.size() - pos)
      throw Failure(path + ": truncated KTNS file (needs " + std::to_string(pos + n) +
                    " bytes, has " + std::to_string(buf.size()) + ")");
    pos += n;
    return buf.data() + pos - n;
  }
  template <typename T>
  T Get() {
    T v;
    std::memcpy(&v, Take(sizeof(T)), sizeof(T));
    return v;
  }
  std::string Str() {
    uint32_t n = Get<uint32_t>();
    return std::string(Take(n), n);
  }
};

std::vector<Named> ReadKtns(const std::string& path) {
  std::string buf = ReadFile(path);
  Reader r{path, buf};
  if (std::string(r.Take(4), 4) != "KTNS") throw Failure(path + ": not a KTNS file (bad magic)");
  uint32_t version = r.Get<uint32_t>();
  if (version != 1)
    throw Failure(path + ": KTNS version " + std::to_string(version) + ", expected 1");
  uint32_t count = r.Get<uint32_t>();
  std::vector<Named> out;
  for (uint32_t i = 0; i < count; ++i) {
    std::string name = r.Str(), dtype = r.Str();
    auto it = std::find_if(kDTypes.begin(), kDTypes.end(),
                           [&](const auto& d) { return d.first == dtype; });
    if (it == kDTypes.end())
      throw Failure(path + ": tensor " + name + " has unknown dtype " + dtype);
    uint32_t ndim = r.Get<uint32_t>();
    std::vector<int64_t> shape(ndim);
    for (auto& d : shape) {
      d = r.Get<int64_t>();
      if (d < 0) throw Failure(path + ": tensor " + name + " has a negative dimension");
    }
    uint64_t nbytes = r.Get<uint64_t>();
    ffi::Tensor t = ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::ShapeView(shape.data(), ndim),
                                             it->second, DLDevice{kDLCPU, 0});
    size_t need = ffi::GetDataSize(t.numel(), t.dtype());
    if (nbytes != need)
      throw Failure(path + ": tensor " + name + " has " + std::to_string(nbytes) +
                    " bytes, its dtype and shape need " + std::to_string(need));
    std::memcpy(t.data_ptr(), r.Take(nbytes), nbytes);
    out.push_back({name, t});
  }
  if (r.pos != buf.size()) throw Failure(path + ": stray bytes after the last tensor");
  return out;
}

void WriteKtns(const std::string& path, const std::vector<Named>& tensors) {
  std::string out = "KTNS";
  auto put = [&out](const void* p, size_t n) { out.append(static_cast<const char*>(p), n); };
  auto u32 = [&put](uint32_t v) { put(&v, 4); };
  u32(1);
  u32(static_cast<uint32_t>(tensors.size()));
  for (const auto& [name, t] : tensors) {
    if (t.device().device_type != kDLCPU) throw Failure(name + " is not on the CPU");
    if (!t.IsContiguous()) throw Failure(name + " is not contiguous");
    std::string dtype = DTypeName(t.dtype());
    u32(static_cast<uint32_t>(name.size()));
    put(name.data(), name.size());
    u32(static_cast<uint32_t>(dtype.size()));
    put(dtype.data(), dtype.size());
    u32(static_cast<uint32_t>(t.ndim()));
    for (int64_t d : t.shape()) put(&d, 8);
    uint64_t nbytes = static_cast<uint64_t>(t.numel()) * (dtype == "bool" ? 1 : t.dtype().bits / 8);
    put(&nbytes, 8);
    put(static_cast<const char*>(t.data_ptr()) + t.byte_offset(), nbytes);
  }
  std::string tmp = path + ".tmp";
  std::ofstream f(tmp, std::ios::binary);
  if (!f.write(out.data(), static_cast<std::streamsize>(out.size())) || (f.close(), !f))
    throw Failure(tmp + ": cannot write file");
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw Failure(path + ": cannot write file");
}

// Flattens main's result (a tensor, or a possibly nested tuple of tensors) into tensors.
void Flatten(const ffi::Any& v, std::vector<ffi::Tensor>* out) {
  if (auto t = v.as<ffi::Tensor>()) {
    out->push_back(*t);
  } else if (auto a = v.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& x : *a) Flatten(x, out);
  } else {
    throw Failure("main returned a " + v.GetTypeKey() + ", not tensors");
  }
}

ffi::Function GetFunction(const ffi::Module& mod, const std::string& name) {
  auto f = mod->GetFunction(name, true);
  if (!f) throw Failure("the module has no function " + name);
  return *f;
}

ffi::Function GetGlobal(const std::string& name) {
  auto f = ffi::Function::GetGlobal(name);
  if (!f) throw Failure("the TVM runtime has no function " + name);
  return *f;
}

long long PeakRssBytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::atoll(line.c_str() + 6) * 1024;
  return -1;
}

// One TVM worker thread per core this process may run on, unless TVM_NUM_THREADS says
// otherwise: TVM's own default halves the core count on x86 (it assumes two hardware
// threads per core), which leaves half of a machine without them idle.
void DefaultThreadsToCores() {
  if (std::getenv("TVM_NUM_THREADS") != nullptr) return;
  cpu_set_t cpus;
  if (sched_getaffinity(0, sizeof(cpus), &cpus) != 0) return;
  setenv("TVM_NUM_THREADS", std::to_string(CPU_COUNT(&cpus)).c_str(), 1);
}

int Run(int argc, char** argv) {
  DefaultThreadsToCores();
  std::vector<std::string> args(argv + 1, argv + argc);
  int repeat = 1;
  auto flag = std::find(args.begin(), args.end(), "--repeat");
  if (flag != args.end()) {
    if (flag + 1 == args.end() || (repeat = std::atoi((flag + 1)->c_str())) < 1) {
      std::cerr << "error: --repeat takes a positive integer\n";
      return 2;
    }
    args.erase(flag, flag + 2);
  }
  if (args.size() != 3) {
    std::cerr << "usage: kompakt-tvm-runner BUNDLE_DIR INPUTS.ktns OUTPUTS.ktns [--repeat N]\n";
    return 2;
  }
  const std::string bundle = args[0], so = bundle + "/model.so";
  if (!std::ifstream(so)) throw Failure(so + ": no such file (not a TVM bundle?)");
  std::vector<Named> params = ReadKtns(bundle + "/params.ktns");
  std::vector<Named> inputs = ReadKtns(args[1]);

  ffi::Module lib = ffi::Module::LoadFromFile(so);
  ffi::Module vm = GetFunction(lib, "vm_load_executable")().cast<ffi::Module>();
  GetFunction(vm, "vm_initialization")(static_cast<int>(kDLCPU), 0, 2 /* pooled allocator */);
  ffi::Function main_fn = GetFunction(vm, "main");
  int64_t arity = GetFunction(vm, "get_function_arity")("main").cast<int64_t>();
  int64_t want = arity - static_cast<int64_t>(params.size());
  if (static_cast<int64_t>(inputs.size()) != want)
    throw Failure("wrong number of inputs: " + std::to_string(inputs.size()) + " in " + args[1] +
                  ", the model takes " + std::to_string(want) + " (main takes " +
                  std::to_string(arity) + " arguments, " + std::to_string(params.size()) +
                  " of them parameters)");

  std::vector<ffi::AnyView> call_args;
  for (const auto& n : inputs) call_args.emplace_back(n.tensor);
  for (const auto& n : params) call_args.emplace_back(n.tensor);
  ffi::Any result;
  std::vector<double> ms;
  for (int i = 0; i < repeat; ++i) {
    result = ffi::Any();  // release the previous run's outputs
    auto start = std::chrono::steady_clock::now();
    main_fn.CallPacked(call_args.data(), static_cast<int32_t>(call_args.size()), &result);
    std::chrono::duration<double, std::milli> took = std::chrono::steady_clock::now() - start;
    ms.push_back(took.count());
  }
  std::vector<ffi::Tensor> outs;
  Flatten(result, &outs);
  std::vector<Named> named;
  for (size_t i = 0; i < outs.size(); ++i)
    named.push_back({"output_" + std::to_string(i), outs[i]});
  WriteKtns(args[2], named);

  std::ostringstream each;
  for (size_t i = 0; i < ms.size(); ++i) each << (i ? ", " : "") << ms[i];
  std::sort(ms.begin(), ms.end());
  size_t mid = ms.size() / 2;
  double median = ms.size() % 2 ? ms[mid] : (ms[mid - 1] + ms[mid]) / 2;
  int threads = GetGlobal("runtime.NumThreads")().cast<int>();
  std::printf(
      "{\"median_ms\": %.6g, \"runs\": %d, \"threads\": %d, \"peak_rss_bytes\": %lld, "
      "\"ms\": [%s]}\n",
      median, repeat, threads, PeakRssBytes(), each.str().c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const ffi::Error& e) {
    std::cerr << "error: TVM: " << e.kind() << ": " << e.message() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
  }
  return 1;
}
