# nvcc compile + SASS checks of the torch-free CUDA sources (csrc/cuda/*.cu except the *_op.cu
# torch wrappers, which tests/test_cuda_compile.py compiles against torch's headers).
#   build: every source -> one cubin per arch in SK_CUDA_ARCHS (ptxas -v log beside it, timed)
#   ctest: cuda_sass_<name>_<arch> reads the SASS (cuobjdump) and asserts sparse HMMA
#          (HMMA.SP) is present and that ptxas reports 0 bytes of spill stores/loads.
# No GPU is needed. Skipped entirely when nvcc is absent; the ctest checks report "skipped"
# when no cuobjdump is found (CUDA toolkit or Triton's wheel).
find_program(SK_NVCC nvcc)
if(NOT SK_NVCC)
  message(STATUS "sparsekern: nvcc not found; CUDA compile checks skipped")
  return()
endif()

get_filename_component(_sk_nvcc_dir ${SK_NVCC} DIRECTORY)
set(_sk_triton_globs ${CMAKE_SOURCE_DIR}/.venv/lib/python*/site-packages/triton/backends/nvidia/bin)
if(Python_EXECUTABLE)
  get_filename_component(_sk_py_dir ${Python_EXECUTABLE} DIRECTORY)
  list(APPEND _sk_triton_globs ${_sk_py_dir}/../lib/python*/site-packages/triton/backends/nvidia/bin)
endif()
file(GLOB _sk_triton_bins LIST_DIRECTORIES true ${_sk_triton_globs})
find_program(SK_CUOBJDUMP cuobjdump HINTS ${_sk_nvcc_dir} ${_sk_triton_bins})

set(SK_CUDA_ARCHS sm_80 sm_90a CACHE STRING "Architectures the CUDA compile checks build for")
file(GLOB SK_CUDA_SOURCES CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/csrc/cuda/*.cu)
list(FILTER SK_CUDA_SOURCES EXCLUDE REGEX "_op\\.cu$")
file(GLOB SK_CUDA_HEADERS CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/csrc/cuda/*.cuh)

set(_sk_cubins)
foreach(src ${SK_CUDA_SOURCES})
  get_filename_component(name ${src} NAME_WE)
  foreach(arch ${SK_CUDA_ARCHS})
    set(cubin ${CMAKE_BINARY_DIR}/cuda/${name}.${arch}.cubin)
    set(log ${CMAKE_BINARY_DIR}/cuda/${name}.${arch}.ptxas.log)
    add_custom_command(
      OUTPUT ${cubin} ${log}
      COMMAND ${CMAKE_COMMAND} -DNVCC=${SK_NVCC} -DSRC=${src} -DARCH=${arch} -DCUBIN=${cubin} -DLOG=${log}
              -DINCLUDE=${CMAKE_SOURCE_DIR}/csrc -P ${CMAKE_SOURCE_DIR}/cmake/nvcc_cubin.cmake
      DEPENDS ${src} ${SK_CUDA_HEADERS} ${CMAKE_SOURCE_DIR}/cmake/nvcc_cubin.cmake
      COMMENT "nvcc ${name}.cu -> ${arch} cubin"
      VERBATIM)
    list(APPEND _sk_cubins ${cubin})
    if(SK_CUOBJDUMP)
      add_test(NAME cuda_sass_${name}_${arch}
               COMMAND ${CMAKE_COMMAND} -DCUOBJDUMP=${SK_CUOBJDUMP} -DCUBIN=${cubin} -DLOG=${log}
                       -P ${CMAKE_SOURCE_DIR}/cmake/check_sass.cmake)
    else()
      add_test(NAME cuda_sass_${name}_${arch} COMMAND ${CMAKE_COMMAND} -E echo "no cuobjdump found")
      set_tests_properties(cuda_sass_${name}_${arch} PROPERTIES DISABLED TRUE)
    endif()
  endforeach()
endforeach()
add_custom_target(sparsekern_cuda_cubins ALL DEPENDS ${_sk_cubins})
