# Cross-compiling the runtime for 64-bit Arm Linux (glibc) with Debian's cross toolchain
# (apt-get install g++-aarch64-linux-gnu). Used by `fleet device bootstrap` for an aarch64
# board (fleet/bootstrap/cross.py); by hand:
#   cmake -S runtime -B build/aarch64 -DCMAKE_TOOLCHAIN_FILE=runtime/cmake/aarch64-linux-gnu.cmake
#   cmake --build build/aarch64 -j2        # -> build/aarch64/fleet-probe
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(FLEET_CROSS_TRIPLE aarch64-linux-gnu)
set(CMAKE_C_COMPILER ${FLEET_CROSS_TRIPLE}-gcc)
set(CMAKE_CXX_COMPILER ${FLEET_CROSS_TRIPLE}-g++)
# Debian installs the target's libc and libstdc++ under /usr/<triple>.
set(CMAKE_FIND_ROOT_PATH /usr/${FLEET_CROSS_TRIPLE})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
