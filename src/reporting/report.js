// The script of report.html (inlined into the page by reporting/render.py).
// Click a header of a table.sortable to sort by it (numbers by value, text alphabetically, missing values
// last; click again to reverse). The table gets data-sorted="<key>:<asc|desc>". "#sort=<key>" in the
// address clicks that header once the page is loaded (used by the browser test).
(function () {
  "use strict";
  function value(cell) {
    if (!cell || cell.hasAttribute("data-na")) { return null; }
    var v = cell.getAttribute("data-v");
    if (v !== null) { var n = Number(v); if (!isNaN(n)) { return n; } }
    return cell.textContent.trim().toLowerCase();
  }
  function compare(a, b) {
    if (typeof a === "number" && typeof b === "number") { return a - b; }
    if (typeof a === "number") { return -1; }
    if (typeof b === "number") { return 1; }
    return a < b ? -1 : (a > b ? 1 : 0);
  }
  function sortBy(table, th, col) {
    var body = table.tBodies[0];
    if (!body) { return; }
    var key = th.getAttribute("data-key") || String(col);
    var dir = table.getAttribute("data-sorted") === key + ":asc" ? "desc" : "asc";
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (r1, r2) {
      var a = value(r1.cells[col]), b = value(r2.cells[col]);
      if (a === null || b === null) { return (a === null) - (b === null); }
      var c = compare(a, b);
      return dir === "asc" ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    Array.prototype.forEach.call(th.parentNode.cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir === "asc" ? "ascending" : "descending");
    table.setAttribute("data-sorted", key + ":" + dir);
  }
  var tables = document.querySelectorAll("table.sortable");
  Array.prototype.forEach.call(tables, function (table) {
    if (!table.tHead) { return; }
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.title = "click to sort";
      th.addEventListener("click", function () { sortBy(table, th, col); });
    });
  });
  var m = /^#sort=(.+)$/.exec(window.location.hash);
  if (m) {
    var wanted = decodeURIComponent(m[1]);
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable thead th"), function (th) {
      if (th.getAttribute("data-key") === wanted) { th.click(); }
    });
  }
})();
