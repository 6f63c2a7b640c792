# Thin wrapper: `make demo` runs the main job, `make test` builds everything and runs every test.
# Both install missing Debian packages first. BUILD_DIR and CMAKE_ARGS may be overridden.
BUILD_DIR ?= build
CMAKE_ARGS ?=
JOBS ?= $(shell nproc)
# Open MPI as root, and more ranks than cores, for the multi-rank tests.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export OMPI_MCA_rmaps_base_oversubscribe := 1

.PHONY: deps configure build test demo clean

deps:
	@bash .ci/install-deps.sh

configure: deps
	cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release $(CMAKE_ARGS)

build: configure
	cmake --build $(BUILD_DIR) -j $(JOBS)

test: build
	cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS)

demo: build
	$(BUILD_DIR)/helix info
	$(BUILD_DIR)/helix train --config examples/configs/demo.ini --out runs/demo

clean:
	rm -rf $(BUILD_DIR)
