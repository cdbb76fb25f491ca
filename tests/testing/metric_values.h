// Reading a prometheus-cpp registry in tests, without scraping: a counter's or gauge's value, a histogram's
// sample count and sum, by metric name and exact label set.
#pragma once

#include <map>
#include <optional>
#include <string>

#include <prometheus/registry.h>

namespace attnserve::testing {

struct MetricValue {
  double value = 0;           // counter or gauge value; histogram sum
  uint64_t sample_count = 0;  // histograms only
};

// nullopt when no series of that name has exactly these labels.
inline std::optional<MetricValue> FindMetric(const prometheus::Registry& registry, const std::string& name,
                                             const std::map<std::string, std::string>& labels) {
  for (const prometheus::MetricFamily& family : registry.Collect()) {
    if (family.name != name) continue;
    for (const prometheus::ClientMetric& m : family.metric) {
      std::map<std::string, std::string> have;
      for (const auto& l : m.label) have[l.name] = l.value;
      if (have != labels) continue;
      switch (family.type) {
        case prometheus::MetricType::Counter: return MetricValue{m.counter.value, 0};
        case prometheus::MetricType::Gauge: return MetricValue{m.gauge.value, 0};
        case prometheus::MetricType::Histogram: return MetricValue{m.histogram.sample_sum, m.histogram.sample_count};
        default: return MetricValue{};
      }
    }
  }
  return std::nullopt;
}

}  // namespace attnserve::testing
