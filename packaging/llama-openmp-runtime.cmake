# Included into llama-cpp-python's CMake project by `parrot-edge bundle` (CMAKE_PROJECT_llama_cpp_INCLUDE).
# The portable build's libraries use OpenMP, and a school computer without a compiler may have no libgomp.
# So the compiler's own copy goes into the wheel beside libggml-base, whose RUNPATH ($ORIGIN) finds it; the
# CPU backends, loaded later, then share that already loaded copy.
execute_process(COMMAND "${CMAKE_CXX_COMPILER}" -print-file-name=libgomp.so.1
                OUTPUT_VARIABLE libgomp OUTPUT_STRIP_TRAILING_WHITESPACE COMMAND_ERROR_IS_FATAL ANY)
if(NOT IS_ABSOLUTE "${libgomp}")
    message(FATAL_ERROR "the portable build needs GCC's OpenMP runtime, libgomp (Debian: libgomp1)")
endif()
file(REAL_PATH "${libgomp}" libgomp)
install(FILES "${libgomp}" DESTINATION llama_cpp/lib RENAME libgomp.so.1)
