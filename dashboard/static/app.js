// cxr-triage dashboard: live regions, keyboard, CAM overlay. Plain JS, no library, no CDN
// (hospital networks are often offline; the Content-Security-Policy allows this origin only).
(function () {
  "use strict";

  function typing(e) {
    var t = e.target && e.target.tagName;
    return t === "INPUT" || t === "TEXTAREA" || t === "SELECT" || e.ctrlKey || e.metaKey || e.altKey;
  }

  // An element with data-live-url has its content re-fetched every data-live-interval seconds.
  function live(el) {
    var ms = 1000 * parseFloat(el.dataset.liveInterval || "10"), last = null;
    function tick() {
      fetch(el.dataset.liveUrl, {credentials: "same-origin"}).then(function (r) {
        if (r.redirected) { window.location.reload(); return null; }  // session ended: log in
        if (!r.ok) return null;
        var count = el.dataset.liveCount && document.getElementById(el.dataset.liveCount);
        if (count && r.headers.get("X-Total-Count")) count.textContent = r.headers.get("X-Total-Count");
        return r.text();
      }).then(function (html) {
        if (html !== null && html !== last) {
          last = html;
          el.innerHTML = html;
          el.dispatchEvent(new CustomEvent("live:updated"));
        }
      }).catch(function () {}).then(function () { setTimeout(tick, ms); });
    }
    setTimeout(tick, ms);
  }

  // Worklist: j/k or arrows move a selection, Enter or o opens it; survives live refreshes.
  function worklist(body) {
    var selected = null;
    function rows() { return Array.prototype.slice.call(body.querySelectorAll("tr[data-study-id]")); }
    function mark() {
      rows().forEach(function (r) { r.classList.toggle("selected", r.dataset.studyId === selected); });
    }
    function move(step) {
      var list = rows(), i = list.findIndex(function (r) { return r.dataset.studyId === selected; });
      if (!list.length) return;
      i = i < 0 ? 0 : Math.min(list.length - 1, Math.max(0, i + step));
      selected = list[i].dataset.studyId;
      mark();
      list[i].scrollIntoView({block: "nearest"});
    }
    body.addEventListener("live:updated", mark);
    body.addEventListener("click", function (e) {
      var row = e.target.closest("tr[data-href]");
      if (row && e.target.tagName !== "A") window.location = row.dataset.href;
    });
    document.addEventListener("keydown", function (e) {
      if (typing(e)) return;
      if (e.key === "j" || e.key === "ArrowDown") { move(1); e.preventDefault(); }
      else if (e.key === "k" || e.key === "ArrowUp") { move(-1); e.preventDefault(); }
      else if (e.key === "v" && selected) {
        var open = body.querySelector('tr[data-study-id="' + selected + '"] td.open-viewer a');
        if (open) { window.location = open.href; }
      }
      else if ((e.key === "Enter" || e.key === "o") && selected) {
        var row = body.querySelector('tr[data-study-id="' + selected + '"]');
        if (row) window.location = row.dataset.href;
      }
    });
  }

  // Study: the CAM is a transparent layer over the image; the slider sets its opacity.
  function study() {
    var cam = document.getElementById("cam"), toggle = document.getElementById("cam-toggle");
    var slider = document.getElementById("cam-opacity"), label = document.getElementById("cam-opacity-value");
    function show(on) {
      if (!cam) return;
      cam.hidden = !on;
      toggle.checked = on;
      sessionStorage.setItem("cxr.cam", on ? "on" : "off");  // stays on from study to study
    }
    function opacity() {
      cam.style.opacity = String(slider.value / 100);
      label.textContent = slider.value + " %";
      sessionStorage.setItem("cxr.camOpacity", slider.value);
    }
    if (cam) {
      slider.value = sessionStorage.getItem("cxr.camOpacity") || slider.value;
      opacity();
      show(sessionStorage.getItem("cxr.cam") === "on");
      toggle.addEventListener("change", function () { show(toggle.checked); });
      slider.addEventListener("input", opacity);
    }
    document.addEventListener("keydown", function (e) {
      if (typing(e)) return;
      var link = {j: "next-study", ArrowDown: "next-study", k: "prev-study", ArrowUp: "prev-study"}[e.key];
      if (link && document.getElementById(link)) { window.location = document.getElementById(link).href; }
      else if (e.key === "o" && cam) { show(cam.hidden); }
      else if (e.key === "v" && document.getElementById("open-in-viewer")) { window.location = document.getElementById("open-in-viewer").href; }
      else if (e.key === "r") { var b = document.getElementById("mark-read"); b.form.requestSubmit(b); }
    });
    // The OHIF viewer in the page (same origin): inside it its own keys apply (arrows move
    // through images, r rotates), but j/k still move between studies and Esc comes back here.
    var frame = document.getElementById("ohif-frame");
    if (frame) {
      frame.addEventListener("load", function () {
        var doc = frame.contentDocument;
        if (!doc) return;
        doc.addEventListener("keydown", function (e) {
          if (typing(e)) return;
          var link = {j: "next-study", k: "prev-study"}[e.key];
          if (link && document.getElementById(link)) {
            e.preventDefault(); e.stopPropagation();
            window.location = document.getElementById(link).href;
          } else if (e.key === "Escape") {
            frame.blur(); document.getElementById("mark-read").focus();
          }
        }, true);
      });
    }
  }

  // Admin waiting times: numbers refreshed from the JSON endpoint.
  function waiting(table) {
    function fmt(v) { return v === null ? "—" : v.toFixed(1); }
    function fill(row, s) {
      if (!row || !s) return;
      row.querySelector(".n").textContent = s.n;
      row.querySelector(".mean").textContent = fmt(s.mean_h);
      row.querySelector(".max").textContent = fmt(s.max_h);
    }
    setInterval(function () {
      fetch(table.dataset.waitingUrl, {credentials: "same-origin"})
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (doc) {
          if (!doc) return;
          ["abnormal", "normal", "unscored"].forEach(function (g) {
            fill(document.querySelector('#waiting tr[data-group="' + g + '"]'), doc[g]);
          });
          Object.keys(doc.by_class).forEach(function (c) {
            fill(document.querySelector('#waiting-by-class tr[data-class="' + c + '"]'), doc.by_class[c]);
          });
          document.getElementById("as-of").textContent = doc.as_of;
        }).catch(function () {});
    }, 1000 * parseFloat(table.dataset.waitingInterval || "15"));
  }

  document.querySelectorAll("[data-live-url]").forEach(live);
  var body = document.getElementById("worklist-rows");
  if (body) worklist(body);
  if (document.getElementById("review-form")) study();
  var table = document.querySelector("table[data-waiting-url]");
  if (table) waiting(table);
})();
