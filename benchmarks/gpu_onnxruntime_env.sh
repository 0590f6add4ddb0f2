# Sourced by the GPU check scripts, with LIB set to an onnxruntime-gpu
# build's folder: finds CUDA, cuBLAS, cuFFT, cuRAND, cuDNN (and TensorRT,
# when present) wherever the machine has them (PyTorch's Python packages,
# the toolkit), puts them and LIB on the library path, and points effir at
# LIB's ONNX Runtime. Sets `libdirs` to the folders found.
libdirs=$(find / \( -path /proc -o -path /sys -o -path /dev -o -path /tmp -o -path "$PWD" \) -prune -o \
    \( -name 'libcudnn.so.9*' -o -name 'libcublasLt.so.*' -o -name 'libcudart.so.*' -o -name 'libcufft.so.*' \
    -o -name 'libcurand.so.*' -o -name 'libnvinfer.so*' \) -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)
export LD_LIBRARY_PATH="$LIB:$libdirs:${LD_LIBRARY_PATH:-}"
export ORT_DYLIB_PATH="$LIB/libonnxruntime.so"
