// jemalloc's options for every Strata binary (server, CLI, benches, tests): jemalloc reads the
// global `malloc_conf` the program defines at its first allocation; MALLOC_CONF in the environment
// is applied after it, so an operator can still override each option.
//
// Why: a training step frees and reallocates the same large activation and gradient buffers every
// step. With jemalloc's defaults, freed pages are returned to the OS within seconds (and at once for
// allocations above oversize_threshold, 8 MiB, which live in a dedicated arena that purges
// immediately), so every step faults them in again: a 58 s stories260K training run took 18.6 M minor
// page faults and ran 2.9x slower than with purging off (issue 20, docs/benchmarks.md).
//
// dirty_decay_ms:-1 / muzzy_decay_ms:-1: freed pages stay mapped and are reused by the next step.
// Memory stays bounded by the process's own peak (jemalloc reuses what it keeps; the peak of a
// training run is reached in its first step), measured flat over long runs (docs/benchmarks.md).
extern "C" {
// NOLINTNEXTLINE: the name and type are jemalloc's interface.
const char* malloc_conf = "dirty_decay_ms:-1,muzzy_decay_ms:-1";
}
