// Small time-series line charts in SVG for the dashboard: no library, a few series per chart,
// a fixed time window ending now. `KevlardChart(figure, {title, keys, fmt, windowS})`, then
// `chart.push(t, [v0, v1, ...])` (seconds; a null value leaves a gap) and `chart.draw(t)`.
window.KevlardChart = (() => {
  "use strict";

  const W = 300;
  const H = 90;
  const SVG = "http://www.w3.org/2000/svg";

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function svgEl(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    return node;
  }

  return function KevlardChart(fig, { title, keys, fmt, windowS }) {
    const data = keys.map(() => []); // per series: [[t, value or null], ...]
    const head = el("div", "chart-head");
    const value = el("b", "", "–");
    head.append(el("span", "", title), value);
    const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
    const legend = el("div", "keys");
    keys.forEach((k, i) => {
      const key = el("span");
      key.append(el("i", `k${i}`), document.createTextNode(k));
      legend.append(key);
    });
    const maxLabel = el("span", "max", "");
    legend.append(maxLabel);
    fig.append(head, svg, legend);

    function push(t, values) {
      values.forEach((v, i) => {
        const series = data[i];
        series.push([t, v == null ? null : v]);
        while (series.length && series[0][0] < t - windowS) series.shift();
      });
    }

    function draw(t) {
      let max = 0;
      for (const series of data) for (const [, v] of series) if (v != null && v > max) max = v;
      const top = max > 0 ? max * 1.15 : 1;
      const x = (tt) => ((tt - (t - windowS)) / windowS) * W;
      const y = (v) => H - 2 - (v / top) * (H - 6);
      const children = [0.25, 0.5, 0.75].map((frac) => svgEl("line", {
        class: "axis", x1: 0, x2: W, y1: H * frac, y2: H * frac, "vector-effect": "non-scaling-stroke",
      }));
      data.forEach((series, i) => {
        let d = "";
        series.forEach(([tt, v], j) => {
          if (v == null) return;
          const before = j > 0 ? series[j - 1][1] : null;
          const after = j + 1 < series.length ? series[j + 1][1] : null;
          d += `${before == null ? "M" : "L"}${x(tt).toFixed(1)},${y(v).toFixed(1)}`;
          if (before == null && after == null) d += "h2"; // a lone sample still shows
        });
        if (d) children.push(svgEl("path", { class: `series s${i}`, d }));
      });
      svg.replaceChildren(...children);
      const latest = data.map((s) => (s.length ? s[s.length - 1][1] : null));
      value.textContent = latest.map((v) => (v == null ? "–" : fmt(v))).join(" / ");
      maxLabel.textContent = max > 0 ? `max ${fmt(max)}` : "";
    }

    return { push, draw };
  };
})();
