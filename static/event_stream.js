// kevlard dashboard: one /api/events stream per browser, not one per tab.
//
// A browser opens at most 6 HTTP/1.1 connections to one host, and an SSE stream holds one for as
// long as the page is open: with six dashboard tabs every connection is held and each tab's polls
// and prompt box wait forever. So the tabs of one browser elect a leader (a Web Lock, released when
// its tab closes, then granted to the next waiting tab); the leader alone connects htmx's SSE
// extension to /api/events and forwards every event, and whether the stream is open, to the other
// tabs over a BroadcastChannel. A tab that joins gets the leader's latest events first, as the
// stream's own replay would have given them. Where Web Locks are missing (a page served over plain
// http from another host is not a secure context), the tabs elect over the channel itself: the
// leader says so every second, and when it has been silent for three (or said goodbye) a follower
// takes over; two tabs that start together may both lead, which costs one connection more.
//
// Events reach dashboard.js as DOM events on #event-source: "kevlard:event" {type, data} and
// "kevlard:stream" {open, shared}.
(() => {
  "use strict";

  const LOCK = "kevlard-events-leader";
  const CHANNEL = "kevlard-events";
  const KEEP = 100; // events a joining tab is given: the size of /api/events' own replay

  const source = document.getElementById("event-source");
  const log = document.getElementById("event-log");
  const emit = (name, detail) => source.dispatchEvent(new CustomEvent(name, { detail }));
  const channel = "BroadcastChannel" in window ? new BroadcastChannel(CHANNEL) : null;
  const recent = [];
  let leading = false;
  let open = false;

  function connect() {
    // what the template would have said; set only now so that a following tab never connects
    source.setAttribute("hx-ext", "sse");
    source.setAttribute("sse-connect", source.dataset.sseUrl);
    log.setAttribute("hx-trigger", log.dataset.sseTrigger);
    htmx.process(source);
  }

  function lead() {
    leading = true;
    source.addEventListener("htmx:sseOpen", () => setOpen(true));
    source.addEventListener("htmx:sseError", () => setOpen(false));
    log.addEventListener("htmx:sseMessage", (e) => {
      const message = { type: e.detail.type, data: e.detail.data };
      recent.push(message);
      if (recent.length > KEEP) recent.shift();
      if (channel) channel.postMessage({ event: message });
      emit("kevlard:event", message);
    });
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", connect);
    else connect();
  }

  function setOpen(value) {
    open = value;
    if (channel) channel.postMessage({ open });
    emit("kevlard:stream", { open, shared: false });
  }

  function follow() {
    emit("kevlard:stream", { open: false, shared: true });
    channel.postMessage({ hello: true });
  }

  let leaderHeardAt = 0; // (election without Web Locks) when a leader last said so
  if (channel) {
    channel.onmessage = (e) => {
      const msg = e.data || {};
      if (leading) {
        if (msg.hello) channel.postMessage({ open, replay: recent, leader: true });
        return;
      }
      if (msg.leader) leaderHeardAt = performance.now();
      if (msg.bye) leaderHeardAt = 0;
      if (msg.replay) for (const message of msg.replay) emit("kevlard:event", message);
      if (msg.event) emit("kevlard:event", msg.event);
      if (msg.open !== undefined) emit("kevlard:stream", { open: msg.open, shared: true });
    };
  }

  function elect() {
    // no Web Locks: ask, and lead unless a leader answers; then take over once it falls silent
    const LEADER_EVERY_MS = 1000;
    follow();
    const check = () => {
      if (leading) return;
      if (performance.now() - leaderHeardAt < 3 * LEADER_EVERY_MS) {
        setTimeout(check, LEADER_EVERY_MS);
        return;
      }
      lead();
      const beat = () => channel.postMessage({ leader: true, open });
      beat();
      setInterval(beat, LEADER_EVERY_MS);
      addEventListener("pagehide", () => channel.postMessage({ bye: true }));
    };
    setTimeout(check, 300 + Math.random() * 300);
  }

  if (channel && !navigator.locks) {
    elect();
  } else if (channel) {
    // held until this tab goes away; a following tab waits in line to take over
    navigator.locks.request(LOCK, { ifAvailable: true }, (lock) => {
      if (lock) return new Promise(() => lead());
      follow();
      navigator.locks.request(LOCK, () => new Promise(() => lead()));
      return null;
    });
  } else {
    lead();
  }
})();
