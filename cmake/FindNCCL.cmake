# Imported target NCCL::NCCL from the CUDA toolkit's or the system's NCCL.
find_path(NCCL_INCLUDE_DIR nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS} /usr/local/include /usr/include)
find_library(NCCL_LIBRARY NAMES nccl HINTS ${CUDAToolkit_LIBRARY_DIR} /usr/local/lib /usr/lib/x86_64-linux-gnu)
if(NOT NCCL_INCLUDE_DIR OR NOT NCCL_LIBRARY)
  message(FATAL_ERROR "NCCL not found (nccl.h / libnccl): install it or configure with -DHELIX_CUDA=OFF")
endif()
add_library(NCCL::NCCL UNKNOWN IMPORTED)
set_target_properties(NCCL::NCCL PROPERTIES IMPORTED_LOCATION ${NCCL_LIBRARY}
                                            INTERFACE_INCLUDE_DIRECTORIES ${NCCL_INCLUDE_DIR})
message(STATUS "helix: NCCL ${NCCL_LIBRARY}")
