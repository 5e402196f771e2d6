// Draw every chart from its data-plot spec, and keep pages of running studies fresh: poll the page's
// JSON twin and, when it changed, swap in the freshly rendered <main> (numbers, tables, charts).
function drawCharts(root) {
  if (typeof Plotly === "undefined") return;
  root.querySelectorAll("[data-plot]").forEach(function (el) {
    var spec = JSON.parse(el.getAttribute("data-plot"));
    if (spec.layout && spec.layout.title) { spec.layout.title.x = 0.01; spec.layout.title.xanchor = "left"; }
    Plotly.newPlot(el, spec.data, spec.layout, {displaylogo: false, responsive: true, displayModeBar: "hover"});
  });
}

(function () {
  var main = document.querySelector("main");
  drawCharts(document);
  if (!main || !main.dataset.api) return;
  var every = 3000, last = null;
  async function poll() {
    if (main.dataset.live !== "1") return;
    try {
      var text = await (await fetch(main.dataset.api, {cache: "no-store"})).text();
      if (last !== null && text !== last) {
        var html = await (await fetch(location.href, {cache: "no-store"})).text();
        var fresh = new DOMParser().parseFromString(html, "text/html").querySelector("main");
        main.innerHTML = fresh.innerHTML;
        main.dataset.live = fresh.dataset.live;
        main.dataset.refreshed = String(Number(main.dataset.refreshed || 0) + 1);
        drawCharts(main);
      }
      last = text;
    } catch (e) { /* the server restarts or the network blips: try again next time */ }
    setTimeout(poll, every);
  }
  poll();
})();
