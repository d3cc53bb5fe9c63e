// passlab report: wheel zoom and drag pan on every graph, and a self-check
// (every image and drawing rendered, no script errors) that tests read back
// from the DOM as body[data-ok].
(function () {
  "use strict";
  var errors = [];
  window.addEventListener("error", function (e) { errors.push(String(e.message || e)); });

  function PanZoom(box) {
    var svg = box.querySelector("svg");
    if (!svg) return;
    var vb = svg.viewBox.baseVal, home = [vb.x, vb.y, vb.width, vb.height];
    var pair = box.closest(".pair"), link = pair && pair.parentNode.querySelector("input.link");
    function set(x, y, w, h, quiet) {
      svg.setAttribute("viewBox", [x, y, w, h].join(" "));
      if (quiet || !link || !link.checked) return;
      pair.querySelectorAll(".zoom").forEach(function (other) {   // the same view on the other side
        if (other !== box && other.panzoom) other.panzoom.set(x, y, w, h, true);
      });
    }
    function reset() {
      // the whole graph when it fits; a tall one starts at its top, width fitted (at most 1:1)
      var r = box.getBoundingClientRect(), x = home[0], y = home[1], w = home[2], h = home[3];
      if (r.width <= 0 || r.height <= 0) { set(x, y, w, h, true); return; }
      var vw = Math.max(w, r.width), vh = vw * r.height / r.width;
      if (vh >= h) { set(x, y, w, h, true); return; }
      set(x + (w - vw) / 2, y, vw, vh, true);
    }
    function zoom(f, cx, cy) {
      var r = box.getBoundingClientRect();
      var px = (cx === undefined) ? 0.5 : (cx - r.left) / r.width;
      var py = (cy === undefined) ? 0.5 : (cy - r.top) / r.height;
      var nw = vb.width * f, nh = vb.height * f;
      set(vb.x + (vb.width - nw) * px, vb.y + (vb.height - nh) * py, nw, nh);
    }
    box.addEventListener("wheel", function (e) {
      e.preventDefault();
      zoom(e.deltaY > 0 ? 1.15 : 1 / 1.15, e.clientX, e.clientY);
    }, { passive: false });
    var drag = null;
    box.addEventListener("mousedown", function (e) {
      drag = { x: e.clientX, y: e.clientY, vx: vb.x, vy: vb.y }; box.classList.add("dragging"); e.preventDefault();
    });
    window.addEventListener("mousemove", function (e) {
      if (!drag) return;
      var r = box.getBoundingClientRect();
      var s = Math.max(vb.width / r.width, vb.height / r.height);
      set(drag.vx - (e.clientX - drag.x) * s, drag.vy - (e.clientY - drag.y) * s, vb.width, vb.height);
    });
    window.addEventListener("mouseup", function () { drag = null; box.classList.remove("dragging"); });
    box.addEventListener("dblclick", function () { reset(); });
    box.panzoom = { set: set };
    var pane = box.parentNode;
    pane.querySelectorAll("button[data-zoom]").forEach(function (b) {
      b.addEventListener("click", function () {
        var z = b.getAttribute("data-zoom");
        if (z === "reset") reset(); else zoom(z === "in" ? 1 / 1.3 : 1.3);
      });
    });
    reset();
  }

  function check() {
    var bad = [];
    document.querySelectorAll("img").forEach(function (img) {
      if (!img.complete || img.naturalWidth === 0) bad.push("img " + (img.alt || img.src.slice(0, 40)));
    });
    var n = 0;
    document.querySelectorAll("svg").forEach(function (s) {
      if (s.parentNode.closest && s.parentNode.closest("svg")) return;
      if (s.closest("details:not([open])")) return;
      n += 1;
      var b = s.getBoundingClientRect();
      var inner = s.getBBox ? s.getBBox() : { width: 1, height: 1 };
      if (b.width <= 0 || b.height <= 0 || inner.width <= 0 || inner.height <= 0) bad.push("svg " + (s.id || n));
    });
    var body = document.body;
    body.setAttribute("data-drawings", String(n));
    body.setAttribute("data-errors", errors.concat(bad).join("; "));
    body.setAttribute("data-ok", errors.length || bad.length ? "0" : "1");
  }

  try {
    document.querySelectorAll(".zoom").forEach(PanZoom);
  } catch (e) { errors.push("panzoom: " + e); }
  check();
  window.addEventListener("load", check);
})();
