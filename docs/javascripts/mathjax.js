window.MathJax = {
  tex: { inlineMath: [["\\(", "\\)"]], displayMath: [["\\[", "\\]"]], processEscapes: true, processEnvironments: true },
  options: { ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex" },
  svg: { fontCache: "global" },  // SVG output: glyphs are paths inside the page, no web fonts to fetch
};
// Material emits document$ for every page it shows (and for every page swap if navigation.instant is
// turned on): typeset the page's maths with MathJax 3's API (the vendored tex-svg-full.js is 3.2.2).
// Before MathJax has loaded, window.MathJax is still the configuration above (no startup): MathJax then
// typesets the page by itself once loaded. Afterwards, wait for its startup typesetting, forget the
// previous page's maths (typesetClear), reset TeX's labels and equation numbers (texReset) and typeset.
// No output.clearCache(): that is the CommonHTML output's method; the SVG output has none, and its global
// font cache (an <svg> at the end of <body>) holds every glyph already drawn, which new maths reuses.
document$.subscribe(() => {
  const startup = window.MathJax && window.MathJax.startup;
  if (!startup || !startup.promise) return;
  startup.promise = startup.promise
    .then(() => {
      MathJax.typesetClear();
      MathJax.texReset();
      return MathJax.typesetPromise();
    })
    .catch((error) => console.error("MathJax:", error));
});
