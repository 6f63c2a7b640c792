# Boost.Program_options as the target helix_boost_po. Normally find_package(Boost) finds the
# installed library. Where only Boost's headers are installed (the GPU machine), set
# HELIX_BOOST_PO_SOURCES to a folder of program_options' src/*.cpp of the same Boost version
# and the library is compiled into the build.
set(HELIX_BOOST_PO_SOURCES "" CACHE PATH "Boost.Program_options sources to compile when the library is missing")
add_library(helix_boost_po INTERFACE)
if(HELIX_BOOST_PO_SOURCES)
  find_package(Boost REQUIRED)
  file(GLOB po_srcs ${HELIX_BOOST_PO_SOURCES}/*.cpp)
  add_library(helix_boost_po_built STATIC ${po_srcs})
  target_link_libraries(helix_boost_po_built PUBLIC Boost::headers)
  target_link_libraries(helix_boost_po INTERFACE helix_boost_po_built)
else()
  find_package(Boost REQUIRED COMPONENTS program_options)
  target_link_libraries(helix_boost_po INTERFACE Boost::program_options)
endif()
