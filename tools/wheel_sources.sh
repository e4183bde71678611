# tools/wheel_sources.sh — sourced by gpu_wheel.sh (which writes .devcarry_c/wheel.sources) and by
# gpu_check.sh's build stage (which installs the carried wheel only where that list still holds), so
# that both count the same files. Run from the repo root.

# The first line of wheel.sources: how many files cpp/, third_party/ and python/ hold (__pycache__
# aside), so that a file added without editing any listed one still shows.
wheel_sources_count() {
  echo "# count $(find cpp third_party python -type f -not -path '*/__pycache__/*' | wc -l)"
}
