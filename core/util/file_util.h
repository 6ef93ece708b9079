#pragma once
// Small, durable file-system helpers. All functions are thread-compatible and report failures
// as absl::Status naming the path and the OS error.

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace strata {

// Reads a whole file. NOT_FOUND if missing, INTERNAL on I/O errors.
absl::StatusOr<std::string> ReadFile(const std::string& path);

// Writes `contents` to `path` atomically: a temp file in the same directory, fsync, rename,
// fsync of the directory. Readers see either the old or the new file, never a partial one.
absl::Status WriteFileAtomic(const std::string& path, std::string_view contents);

// fsyncs a file or directory.
absl::Status FsyncPath(const std::string& path);

// Creates a directory and its parents (like mkdir -p).
absl::Status MakeDirs(const std::string& path);

// Atomically replaces directory `dst` by directory `src` (both on the same file system):
// rename dst aside, rename src to dst, fsync the parent, remove the old copy.
absl::Status ReplaceDirAtomic(const std::string& src, const std::string& dst);

// Removes a file or a directory tree; OK if it does not exist.
absl::Status RemoveAll(const std::string& path);

bool PathExists(const std::string& path);

// Lexically normalised absolute path ("a/../b" -> "/cwd/b"); does not touch the file system.
std::string AbsolutePath(const std::string& path);

// True when `path` (after normalisation and resolving symlinks of its existing prefix) lies inside
// `root`. Used to confine export/import paths to configured roots.
bool IsWithinRoot(const std::string& root, const std::string& path);

// SHA-256 of bytes, lower-case hex (OpenSSL). Used as the checksum of state files.
std::string Sha256Hex(std::string_view data);

// SHA-256 of a file, streamed.
absl::StatusOr<std::string> Sha256File(const std::string& path);

}  // namespace strata
