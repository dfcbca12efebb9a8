# cmake -DNVCC= -DSRC= -DARCH= -DCUBIN= -DLOG= -DINCLUDE= -P nvcc_cubin.cmake
# Compiles one .cu to a cubin for one arch, keeps ptxas -v output in LOG, prints the time taken.
get_filename_component(_dir ${CUBIN} DIRECTORY)
file(MAKE_DIRECTORY ${_dir})
string(TIMESTAMP _t0 "%s%f" UTC)
execute_process(
  COMMAND ${NVCC} -cubin -arch=${ARCH} -O3 -std=c++17 -lineinfo -Xptxas -v -I${INCLUDE} -o ${CUBIN} ${SRC}
  RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
string(TIMESTAMP _t1 "%s%f" UTC)
math(EXPR _ms "(${_t1} - ${_t0}) / 1000")
file(WRITE ${LOG} "${_out}${_err}")
get_filename_component(_name ${SRC} NAME)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "nvcc ${_name} (${ARCH}) failed:\n${_out}${_err}")
endif()
message(STATUS "nvcc ${_name} -> ${ARCH}: ${_ms} ms")
