// Runs an AOTInductor package of a fused_poolformer model without Python:
//
//   aoti_poolformer MODEL.pt2 INPUT.bin OUTPUT.bin N C H W
//
// INPUT.bin holds the (N, C, H, W) float32 input, raw and little-endian (numpy's
// x.tofile()); the first output of the model is written to OUTPUT.bin the same way, and its
// shape printed.  The input goes to the device the package was compiled for (CPU or CUDA).
//
// The package calls the fused operators through the dispatcher (they are not compiled into
// it), so libfused_poolformer_ops.so must be loaded first: CMakeLists.txt links it with
// --no-as-needed, and main() checks that its registrations are there.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdint>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

void require_fused_operators() {
  const auto schema = c10::Dispatcher::singleton().findSchema({"fused_poolformer::pool_mixer_forward", ""});
  if (!schema.has_value()) {
    throw std::runtime_error(
        "fused_poolformer::pool_mixer_forward is not registered: link libfused_poolformer_ops.so "
        "with -Wl,--no-as-needed (or dlopen it) before loading the package");
  }
}

at::Tensor read_float32(const std::string& path, const std::vector<int64_t>& shape) {
  at::Tensor tensor = at::empty(shape, at::kFloat);
  const auto bytes = static_cast<std::streamsize>(tensor.nbytes());
  std::ifstream file(path, std::ios::binary);
  if (!file.read(static_cast<char*>(tensor.data_ptr()), bytes) || file.peek() != EOF) {
    throw std::runtime_error(path + " does not hold exactly " + std::to_string(bytes) +
                             " bytes (a float32 tensor of the given shape)");
  }
  return tensor;
}

void write_float32(const std::string& path, const at::Tensor& tensor) {
  const at::Tensor host = tensor.to(at::kCPU, at::kFloat).contiguous();
  std::ofstream file(path, std::ios::binary);
  file.write(static_cast<const char*>(host.data_ptr()), static_cast<std::streamsize>(host.nbytes()));
  if (!file) throw std::runtime_error("cannot write " + path);
}

// "cpu" or "cuda", as the package's metadata records where it was compiled.
c10::Device package_device(torch::inductor::AOTIModelPackageLoader& loader) {
  const auto metadata = loader.get_metadata();
  const auto key = metadata.find("AOTI_DEVICE_KEY");
  return c10::Device(key == metadata.end() ? std::string("cpu") : key->second);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 8) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt2 INPUT.bin OUTPUT.bin N C H W\n";
    return 2;
  }
  try {
    require_fused_operators();
    std::vector<int64_t> shape;
    for (int i = 4; i < 8; ++i) shape.push_back(std::stoll(argv[i]));

    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    const c10::Device device = package_device(loader);
    const at::Tensor input = read_float32(argv[2], shape).to(device);
    const std::vector<at::Tensor> outputs = loader.run({input});
    write_float32(argv[3], outputs.at(0));
    std::cout << "output " << outputs.at(0).sizes() << " on " << device << "\n";
  } catch (const std::exception& error) {
    std::cerr << "aoti_poolformer: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
