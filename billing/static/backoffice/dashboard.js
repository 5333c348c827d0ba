// The back office's dashboard charts (vendored Chart.js); data from #bo-charts.
(function () {
  const d = JSON.parse(document.getElementById("bo-charts").textContent);
  if (typeof Chart === "undefined") { return; }
  const opts = { responsive: true, maintainAspectRatio: false, animation: false };
  const stacked = { ...opts, scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true } } };
  new Chart(document.getElementById("chart-tokens"), { type: "bar", data: { labels: d.days, datasets: [
    { label: "input", data: d.input, backgroundColor: "#a855f7" },
    { label: "cached input", data: d.cached_input, backgroundColor: "#d8b4fe" },
    { label: "output", data: d.output, backgroundColor: "#f59e0b" } ] }, options: stacked });
  new Chart(document.getElementById("chart-revenue"), { type: "line", data: { labels: d.days, datasets: [
    { label: "revenue", data: d.revenue, borderColor: "#16a34a", backgroundColor: "#16a34a33", fill: true, tension: 0.2 } ] },
    options: { ...opts, scales: { y: { beginAtZero: true } } } });
  new Chart(document.getElementById("chart-models"), { type: "bar", data: { labels: d.models, datasets: [
    { label: "tokens", data: d.model_tokens, backgroundColor: "#a855f7", yAxisID: "y" },
    { label: "revenue", data: d.model_revenue, backgroundColor: "#16a34a", yAxisID: "y1" } ] },
    options: { ...opts, scales: { y: { beginAtZero: true, position: "left" }, y1: { beginAtZero: true, position: "right", grid: { drawOnChartArea: false } } } } });
  new Chart(document.getElementById("chart-customers"), { type: "bar", data: { labels: d.customers, datasets: [
    { label: "revenue", data: d.customer_revenue, backgroundColor: "#16a34a" } ] }, options: { ...opts, indexAxis: "y" } });
  new Chart(document.getElementById("chart-lag"), { type: "line", data: { labels: d.lag_times, datasets: [
    { label: "lag (s)", data: d.lag_values, borderColor: "#dc2626", pointRadius: 0 } ] }, options: { ...opts, scales: { y: { beginAtZero: true } } } });
})();
