// Ward portal: the one script of our own (served from the binary; the CSP allows no inline
// script). It only adds the copy button on the page that shows a new key once.
document.addEventListener("click", function (ev) {
  var button = ev.target.closest("button[data-copy]");
  if (!button) return;
  var source = document.getElementById(button.getAttribute("data-copy"));
  if (!source || !navigator.clipboard) return;
  navigator.clipboard.writeText(source.textContent).then(function () {
    button.textContent = "Copied";
  });
});
