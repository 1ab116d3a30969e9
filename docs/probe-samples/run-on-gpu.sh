#!/usr/bin/env bash
# Build the runtime on a Linux machine with an NVIDIA GPU and print/save the probe.
# Run from the repository root. Optional: a folder .gl/ with Debian .debs of the Vulkan
# and OpenCL ICD loaders (libvulkan1, ocl-icd-libopencl1) for hosts that ship the NVIDIA
# driver without the loaders; they are unpacked into / first.
#   OUT=/some/dir docs/probe-samples/run-on-gpu.sh
set -u
OUT=${OUT:-/tmp/fleet-probe-out}
mkdir -p "$OUT"
if ls .gl/*.deb >/dev/null 2>&1; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
# The NVIDIA container runtime puts its ICD manifests here when the image has none.
if [ ! -e /usr/share/vulkan/icd.d/nvidia_icd.json ] && [ ! -e /etc/vulkan/icd.d/nvidia_icd.json ] \
   && [ -e /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
echo "== tools"; command -v cmake g++ c++ nvidia-smi; nvidia-smi -L 2>&1 | head -4
echo "== loaders"; ldconfig -p | grep -E "libcuda.so|libvulkan|libOpenCL|libnvidia-opencl" | head
ls /etc/OpenCL/vendors/ 2>&1; ls /usr/share/vulkan/icd.d/ /etc/vulkan/icd.d/ 2>&1

B=/tmp/fleet-probe-build
if command -v cmake >/dev/null; then
  cmake -S runtime -B "$B" -DCMAKE_BUILD_TYPE=Release >"$OUT/build.log" 2>&1 &&
    cmake --build "$B" -j8 >>"$OUT/build.log" 2>&1
  EXE="$B/fleet-probe"
else  # no cmake: the core is plain C++17, one compiler call builds it
  mkdir -p "$B"
  c++ -std=c++17 -O2 -Iruntime/include runtime/src/*.cpp runtime/tools/fleet_probe.cpp \
    -ldl -lpthread -o "$B/fleet-probe" >"$OUT/build.log" 2>&1
  EXE="$B/fleet-probe"
fi
tail -3 "$OUT/build.log"
"$EXE" >"$OUT/probe.json" 2>"$OUT/probe.stderr"
echo "fleet-probe exit status $?"
"$EXE" --no-isolate --compact >"$OUT/probe-inline.json" 2>>"$OUT/probe.stderr"
echo "fleet-probe --no-isolate exit status $?"
cat "$OUT/probe.json"
