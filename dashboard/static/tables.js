// Find and compare in any table marked class="findable": sort by a column (click its header; again
// for the other direction), filter with the search box bound to it (data-filter-for="TABLE_ID"), and
// show or hide the columns whose header has data-optional (the checkboxes bound to it:
// input[data-column-for="TABLE_ID"][value=COLUMN]).
//
// The search box takes words, all of which a row must match: plain text matches anywhere in the row;
// COLUMN:TEXT matches that column's text (COLUMN is its header, case-insensitive: state:failed,
// config.model.width:16); COLUMN>N, COLUMN<N, COLUMN>=N, COLUMN<=N, COLUMN=N compare numbers
// (pckh>70). A cell's data-value, when present, is what sorting and comparisons use.
(function () {
  function headers(table) {
    return Array.from(table.tHead.rows[0].cells).map(function (th) {
      return (th.dataset.column || th.textContent).trim().toLowerCase();
    });
  }

  function cellValue(cell) {
    if (!cell) return "";
    return cell.dataset.value !== undefined ? cell.dataset.value : cell.textContent.trim();
  }

  function asNumber(text) {
    if (text === "" || text === null) return NaN;
    var n = Number(String(text).replace(/[%,]/g, "").replace(/^\+/, ""));
    return isFinite(n) ? n : NaN;
  }

  function parse(query) {
    return query.trim().split(/\s+/).filter(Boolean).map(function (word) {
      var m = word.match(/^([^:<>=]+)(:|>=|<=|>|<|=)(.*)$/);
      if (!m) return {text: word.toLowerCase()};
      return {column: m[1].toLowerCase(), op: m[2], value: m[3].toLowerCase()};
    });
  }

  function matches(row, names, terms) {
    return terms.every(function (t) {
      if (t.text !== undefined) return row.textContent.toLowerCase().indexOf(t.text) >= 0;
      var i = names.indexOf(t.column);
      if (i < 0) return false;  // no such column: nothing matches, so a typo shows an empty table
      var text = cellValue(row.cells[i]).toLowerCase();
      if (t.op === ":") return text.indexOf(t.value) >= 0;
      var a = asNumber(text), b = asNumber(t.value);
      if (isNaN(a) || isNaN(b)) return t.op === "=" && text === t.value;
      return t.op === ">" ? a > b : t.op === "<" ? a < b : t.op === ">=" ? a >= b : t.op === "<=" ? a <= b : a === b;
    });
  }

  function filter(table, query) {
    var names = headers(table), terms = parse(query), shown = 0;
    Array.from(table.tBodies[0].rows).forEach(function (row) {
      var ok = matches(row, names, terms);
      row.hidden = !ok;
      if (ok) shown += 1;
    });
    var count = document.querySelector("[data-count-for='" + table.id + "']");
    if (count) count.textContent = shown + " of " + table.tBodies[0].rows.length;
  }

  function sort(table, index, th) {
    var descending = th.getAttribute("aria-sort") === "ascending";
    Array.from(table.tHead.rows[0].cells).forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", descending ? "descending" : "ascending");
    var rows = Array.from(table.tBodies[0].rows);
    rows.sort(function (r1, r2) {
      var a = cellValue(r1.cells[index]), b = cellValue(r2.cells[index]);
      var x = asNumber(a), y = asNumber(b), c;
      if (!isNaN(x) && !isNaN(y)) c = x - y;
      else if (isNaN(x) !== isNaN(y)) c = isNaN(x) ? 1 : -1;  // numbers before blanks and dashes
      else c = a.localeCompare(b, undefined, {numeric: true, sensitivity: "base"});
      return descending ? -c : c;
    });
    rows.forEach(function (r) { table.tBodies[0].appendChild(r); });
  }

  function showColumn(table, name, on) {  // an optional column (a config value), not a fixed one of that name
    var ths = Array.from(table.tHead.rows[0].cells), names = headers(table);
    var i = ths.findIndex(function (th, k) { return th.hasAttribute("data-optional") && names[k] === name.toLowerCase(); });
    if (i < 0) return;
    Array.from(table.rows).forEach(function (row) { if (row.cells[i]) row.cells[i].hidden = !on; });
  }

  function setUp(root) {
    root.querySelectorAll("table.findable").forEach(function (table) {
      Array.from(table.tHead.rows[0].cells).forEach(function (th, i) {
        th.classList.add("sortable");
        th.title = "sort by " + th.textContent.trim();
        th.addEventListener("click", function () { sort(table, i, th); });
      });
      root.querySelectorAll("[data-column-for='" + table.id + "']").forEach(function (box) {
        showColumn(table, box.value, box.checked);
        box.addEventListener("change", function () { showColumn(table, box.value, box.checked); });
      });
      var input = root.querySelector("[data-filter-for='" + table.id + "']");
      if (input) {
        input.addEventListener("input", function () { filter(table, input.value); });
        if (input.value) filter(table, input.value);
      }
    });
  }

  window.setUpTables = setUp;
  setUp(document);
})();
