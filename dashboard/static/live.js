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

function choiceKey(el) {
  return el.dataset.filterFor ? "filter/" + el.dataset.filterFor : "column/" + el.dataset.columnFor + "/" + el.value;
}

function keepChoices(root) {
  var kept = {};
  root.querySelectorAll("[data-filter-for], [data-column-for]").forEach(function (el) {
    kept[choiceKey(el)] = el.type === "checkbox" ? el.checked : el.value;
  });
  return kept;
}

function restoreChoices(root, kept) {
  root.querySelectorAll("[data-filter-for], [data-column-for]").forEach(function (el) {
    var k = choiceKey(el);
    if (!(k in kept)) return;
    if (el.type === "checkbox") el.checked = kept[k]; else el.value = kept[k];
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
        var kept = keepChoices(main);  // the reader's search words and chosen columns survive a refresh
        main.innerHTML = fresh.innerHTML;
        restoreChoices(main, kept);
        main.dataset.live = fresh.dataset.live;
        main.dataset.refreshed = String(Number(main.dataset.refreshed || 0) + 1);
        drawCharts(main);
        if (window.setUpTables) window.setUpTables(main);
      }
      last = text;
    } catch (e) { /* the server restarts or the network blips: try again next time */ }
    setTimeout(poll, every);
  }
  poll();
})();
