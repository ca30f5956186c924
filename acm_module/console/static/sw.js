// Service worker of the acm console: keeps the app shell (style, script, icons, offline page)
// so the installed app opens without a network. Pages and data are never cached: they are
// per user and must be current; without a network a page shows the offline notice.
"use strict";
var CACHE = "acm-console-{{VERSION}}";
var SHELL = ["/static/console.css", "/static/console.js", "/static/offline.html",
             "/static/icons/icon-192.png", "/static/icons/icon-512.png"];

self.addEventListener("install", function (ev) {
  ev.waitUntil(caches.open(CACHE).then(function (c) { return c.addAll(SHELL); })
    .then(function () { return self.skipWaiting(); }));
});

self.addEventListener("activate", function (ev) {
  ev.waitUntil(caches.keys().then(function (keys) {
    return Promise.all(keys.filter(function (k) { return k !== CACHE; })
      .map(function (k) { return caches.delete(k); }));
  }).then(function () { return self.clients.claim(); }));
});

self.addEventListener("fetch", function (ev) {
  var req = ev.request;
  if (req.method !== "GET") return;
  var url = new URL(req.url);
  if (url.origin !== self.location.origin) return;
  if (url.pathname.indexOf("/static/") === 0) {
    ev.respondWith(caches.match(req, { ignoreSearch: true }).then(function (hit) {
      return hit || fetch(req);
    }));
    return;
  }
  if (req.mode === "navigate") {
    ev.respondWith(fetch(req).catch(function () {
      return caches.match("/static/offline.html");
    }));
  }
});
