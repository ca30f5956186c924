// The console's progressive enhancement: the live alert queue (Server-Sent Events), confirm
// prompts, and the service worker of the installable app. Every page works without it.
"use strict";

(function () {
  function badge(el, prefix, value) {
    el.className = "badge " + prefix + value;
    el.textContent = value.replace(/_/g, " ");
  }

  // The server's format: YYYY-MM-DD HH:MM:SS in the operator's report timezone.
  var clock = null;
  try {
    clock = new Intl.DateTimeFormat("sv-SE", {
      timeZone: document.body.dataset.tz || "UTC", year: "numeric", month: "2-digit",
      day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  } catch (e) { clock = null; }

  function when(iso) {
    if (!iso) return "—";
    var d = new Date(iso);
    if (isNaN(d)) return iso;
    return clock ? clock.format(d) : d.toISOString().replace("T", " ").slice(0, 19);
  }

  function fillRow(tr, a, fresh) {
    var td = tr.cells;
    tr.dataset.alert = a.alert_id;
    var link = td[0].querySelector("a");
    link.href = "/alerts/" + encodeURIComponent(a.alert_id);
    link.textContent = when(a.detected_at);
    td[1].textContent = a.b_number;
    badge(td[2].querySelector(".badge"), "sev-", a.severity);
    td[3].textContent = String(a.distinct);
    // A detection record says nothing of the lifecycle: a known row keeps its status and
    // assignee unless the event carries them.
    if (a.status || fresh) badge(td[4].querySelector(".badge"), "st-", a.status || "NEW");
    td[5].textContent = a.carrier_id || "—";
    if (a.assigned_to || fresh) td[6].textContent = a.assigned_to || "—";
  }

  function liveQueue() {
    var live = document.getElementById("live");
    var table = document.getElementById("queue");
    var tpl = document.getElementById("queue-row");
    if (!live || !table || !tpl || !window.EventSource) return;
    var body = table.tBodies[0];
    var unseen = 0;
    var title = document.title;
    var es = new EventSource(live.dataset.stream + window.location.search);
    es.addEventListener("open", function () {
      live.className = "live on"; live.textContent = "live";
    });
    es.addEventListener("error", function () {
      live.className = "live off"; live.textContent = "reconnecting…";
    });
    es.addEventListener("alert", function (ev) {
      var a = JSON.parse(ev.data);
      var tr = body.querySelector('tr[data-alert="' + CSS.escape(a.alert_id) + '"]');
      var fresh = !tr;
      if (!tr) {
        tr = tpl.content.firstElementChild.cloneNode(true);
        var empty = body.querySelector("tr.empty");
        if (empty) empty.remove();
        body.insertBefore(tr, body.firstChild);
        if (document.hidden) { unseen += 1; document.title = "(" + unseen + ") " + title; }
      }
      fillRow(tr, a, fresh);
      tr.classList.remove("fresh"); void tr.offsetWidth; tr.classList.add("fresh");
    });
    // A status or assignee changed anywhere (console, API, MI): update the row if shown, or
    // drop it from a queue filtered on the status the alert left.
    es.addEventListener("lifecycle", function (ev) {
      var c = JSON.parse(ev.data);
      var tr = body.querySelector('tr[data-alert="' + CSS.escape(c.alert_id) + '"]');
      if (!tr) return;
      if (c.left) { tr.remove(); return; }
      if (c.status) badge(tr.cells[4].querySelector(".badge"), "st-", c.status);
      tr.cells[6].textContent = c.assigned_to || "—";
      tr.classList.remove("fresh"); void tr.offsetWidth; tr.classList.add("fresh");
    });
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden) { unseen = 0; document.title = title; }
    });
  }

  function confirms() {
    document.addEventListener("submit", function (ev) {
      var msg = ev.target.dataset && ev.target.dataset.confirm;
      if (msg && !window.confirm(msg)) ev.preventDefault();
    });
  }

  function localTimes() {
    document.querySelectorAll("time[datetime]").forEach(function (t) {
      t.title = t.getAttribute("datetime");
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    liveQueue();
    confirms();
    localTimes();
    if ("serviceWorker" in navigator) {
      navigator.serviceWorker.register("/sw.js", { scope: "/" }).catch(function () {});
    }
  });
})();
