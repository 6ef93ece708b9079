// The job journal entry (jobs/<id>/job.json), read at every start. Property: an accepted entry
// survives JobToJson -> JobFromJson.
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/jobs/job.h"
#include "fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto job = strata::JobFromJson(std::string(reinterpret_cast<const char*>(data), size), "job.json");
  if (!job.ok()) return 0;
  (void)strata::ValidateTaskSpecification(job->spec);
  auto back = strata::JobFromJson(strata::JobToJson(*job), "round-trip");
  FUZZ_CHECK(back.ok(), "an accepted job.json does not re-parse from JobToJson");
  FUZZ_CHECK(back->id == job->id && back->spec.name == job->spec.name && back->state == job->state,
             "an accepted job.json changes in the round trip");
  return 0;
}
