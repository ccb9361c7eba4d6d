// The dashboard's one script: live rows on the jobs list; on a job's page the log's new lines,
// its status, groups, anchors, search, follow and "load earlier". Every piece of markup comes
// from the hub already rendered (and escaped); this script only puts it in place.
"use strict";

(function () {
  const RECONNECT_MS = 2000;

  // A page's live stream, closed while the page is hidden in the browser's back/forward cache:
  // an open stream there keeps one of the few connections a browser allows per host (six over
  // HTTP/1.1), and a seventh page of the same hub would wait for one. `open` makes the
  // EventSource (or null when there is nothing left to hear); after an error the stream starts
  // again a little later, unless the page is hidden by then.
  function liveStream(open) {
    let events = null;
    let hidden = false;
    const stream = {
      start() {
        stream.stop();
        if (hidden) { return; }
        events = open();
        if (events) {
          events.addEventListener("error", () => { stream.stop(); setTimeout(stream.start, RECONNECT_MS); });
        }
      },
      stop() { if (events) { events.close(); events = null; } },
    };
    window.addEventListener("pagehide", () => { hidden = true; stream.stop(); });
    window.addEventListener("pageshow", (event) => { hidden = false; if (event.persisted) { stream.start(); } });
    stream.start();
    return stream;
  }

  function fragment(html) {
    const template = document.createElement("template");
    template.innerHTML = html;
    return template.content;
  }

  // ------------------------------------------------------------------ the jobs list

  function jobsPage() {
    const table = document.getElementById("jobs");
    const rows = document.getElementById("job-rows");
    const filters = document.getElementById("filters");
    if (filters) {
      for (const select of filters.querySelectorAll("select")) {
        select.addEventListener("change", () => filters.submit());
      }
    }
    let busy = false;
    let again = false;
    async function refresh() {
      if (busy) { again = true; return; }
      busy = true;
      try {
        const answer = await fetch(table.dataset.rows, { credentials: "same-origin" });
        if (answer.ok) { rows.innerHTML = await answer.text(); }
      } finally {
        busy = false;
        if (again) { again = false; refresh(); }
      }
    }
    liveStream(() => {
      const events = new EventSource(table.dataset.events);
      // What changed between the page's render and this stream's start: the rows once more.
      events.addEventListener("open", refresh);
      events.addEventListener("changed", refresh);
      return events;
    });
  }

  // ------------------------------------------------------------------ a job's page

  function jobPage() {
    const log = document.getElementById("log");
    const lines = document.getElementById("log-lines");
    const follow = document.getElementById("follow");
    const head = document.getElementById("job-head");
    let offset = Number(log.dataset.offset);
    let number = Number(log.dataset.nextNumber);
    let start = Number(log.dataset.start);
    let firstNumber = Number(log.dataset.firstNumber);
    let ended = log.dataset.ended === "true";

    // The group that lines without a group line of their own go on in: the last one opened.
    function currentBody() {
      const groups = lines.querySelectorAll(":scope > details.group");
      return groups.length ? groups[groups.length - 1].querySelector(".group-body") : lines;
    }

    function expandPrevious(root) {
      for (const line of root.querySelectorAll(".expands-previous")) {
        const group = line.closest("details.group");
        const previous = group ? group.previousElementSibling : null;
        if (previous && previous.tagName === "DETAILS") { previous.open = true; }
      }
    }

    function append(html) {
      const nodes = fragment(html);
      for (const node of Array.from(nodes.childNodes)) {
        if (node.nodeType !== Node.ELEMENT_NODE) { continue; }
        if (node.tagName === "DETAILS") { lines.appendChild(node); } else { currentBody().appendChild(node); }
      }
      expandPrevious(lines);
      search.mark();
      if (follow.checked) { window.scrollTo(0, document.body.scrollHeight); }
    }

    function connect() {
      if (ended) { return null; }
      const url = `${log.dataset.events}?offset=${offset}&number=${number}`;
      const events = new EventSource(url);
      events.addEventListener("lines", (event) => {
        const data = JSON.parse(event.data);
        offset = data.offset;
        number = data.number;
        append(data.html);
      });
      events.addEventListener("status", (event) => { head.innerHTML = event.data; bindCancel(); });
      events.addEventListener("end", () => { ended = true; log.dataset.ended = "true"; stream.stop(); });
      return events;
    }

    // Anchors: #L120 opens the groups around line 120 and shows it.
    function showTarget() {
      const target = location.hash.length > 1 ? document.getElementById(location.hash.slice(1)) : null;
      if (!target) { return; }
      for (const old of lines.querySelectorAll(".target")) { old.classList.remove("target"); }
      for (let group = target.closest("details"); group; group = group.parentElement.closest("details")) {
        group.open = true;
      }
      target.classList.add("target");
      follow.checked = false;
      target.scrollIntoView({ block: "center" });
    }

    const search = {
      input: document.getElementById("log-search"),
      count: document.getElementById("search-count"),
      at: -1,
      matches() { return Array.from(lines.querySelectorAll(".line.match")); },
      mark() {
        const text = this.input.value.trim().toLowerCase();
        for (const line of lines.querySelectorAll(".line")) {
          const hit = text !== "" && line.querySelector(".text").textContent.toLowerCase().includes(text);
          line.classList.toggle("match", hit);
        }
        const found = text === "" ? 0 : this.matches().length;
        this.count.textContent = text === "" ? "" : `${found} line${found === 1 ? "" : "s"}`;
      },
      go(step) {
        const found = this.matches();
        if (!found.length) { return; }
        this.at = (this.at + step + found.length) % found.length;
        location.hash = found[this.at].id;
      },
    };
    search.input.addEventListener("input", () => { search.at = -1; search.mark(); });
    search.input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") { event.preventDefault(); search.go(event.shiftKey ? -1 : 1); }
    });
    document.getElementById("search-next").addEventListener("click", () => search.go(1));
    document.getElementById("search-prev").addEventListener("click", () => search.go(-1));

    const earlier = document.getElementById("load-earlier");
    earlier.addEventListener("click", async () => {
      earlier.disabled = true;
      try {
        const answer = await fetch(`${log.dataset.earlier}?before=${start}&number=${firstNumber}`,
                                   { credentials: "same-origin" });
        if (!answer.ok) { return; }
        const data = await answer.json();
        lines.insertBefore(fragment(data.html), lines.firstChild);
        start = data.start;
        firstNumber = data.first_number;
        const cut = document.getElementById("log-cut");
        if (start === 0) { earlier.hidden = true; if (cut) { cut.remove(); } }
        search.mark();
      } finally {
        earlier.disabled = false;
      }
    });

    function bindCancel() {
      const form = document.getElementById("cancel-form");
      if (form) {
        form.addEventListener("submit", (event) => {
          if (!window.confirm("Cancel this job?")) { event.preventDefault(); }
        });
      }
    }

    window.addEventListener("hashchange", showTarget);
    bindCancel();
    expandPrevious(lines);
    if (location.hash) { showTarget(); } else if (follow.checked) { window.scrollTo(0, document.body.scrollHeight); }
    const stream = liveStream(connect);
  }

  document.addEventListener("DOMContentLoaded", () => {
    const page = document.body.dataset.page;
    if (page === "jobs") { jobsPage(); }
    if (page === "job") { jobPage(); }
  });
})();
