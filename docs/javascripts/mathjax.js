window.MathJax = {
  tex: { inlineMath: [["\\(", "\\)"]], displayMath: [["\\[", "\\]"]], processEscapes: true, processEnvironments: true },
  options: { ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex" },
  svg: { fontCache: "global" },  // SVG output: glyphs are paths inside the page, no web fonts to fetch
};
// Material's instant navigation swaps pages without reloading scripts: typeset each new page.
// (On the first page MathJax typesets by itself once loaded; before that typesetPromise is absent.)
document$.subscribe(() => {
  if (MathJax.typesetPromise) {
    MathJax.startup.output.clearCache();
    MathJax.typesetClear();
    MathJax.texReset();
    MathJax.typesetPromise();
  }
});
